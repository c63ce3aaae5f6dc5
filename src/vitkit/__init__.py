"""vitkit: the Vision Transformer as real software.

Public API::

    import vitkit
    model = vitkit.create_model("vit_small_patch16_224", num_classes=10)
    logits, attentions = model(images, return_attention=True)
    model.save_pretrained("out/")
    same = vitkit.load_model("out/")
"""

from __future__ import annotations

from typing import Any

from .config import PRESETS, TextConfig, ViTConfig, get_config, list_models, resolve_name
from .errors import CheckpointError, ConfigError, InputError, VitkitError
from .io import load_model
from .io import save_pretrained as _save_pretrained
from .model.image_text import ImageTextModel
from .model.vit import ViT
from .preprocess import Preprocess, preprocess_property

__version__ = "0.1.0"


def create_model(name: str | ViTConfig, **overrides: Any) -> ViT:
    """Build a randomly initialised ViT from a preset name ("vit_base_patch16_224", "ViT-B/16")
    or a config, with field overrides (``num_classes=10, image_size=32, in_channels=1``)."""
    config = name.replace(**overrides) if isinstance(name, ViTConfig) else get_config(name, **overrides)
    return ViT(config)


def from_pretrained(source, **kwargs: Any) -> ViT:
    """Load weights from any supported source (vitkit dir, timm, Hugging Face, torchvision, JAX)."""
    from .interop import from_pretrained as _from_pretrained  # lazy: peers are imported only when needed

    return _from_pretrained(source, **kwargs)


def load_image_text(source, tokenizer=None, device: str = "cpu", strict: bool = True, **hints: Any):
    """Both towers of a CLIP / OpenCLIP / SigLIP / SigLIP2 checkpoint and its tokenizer, as a
    :class:`vitkit.model.image_text.ImageTextModel`; see :func:`vitkit.text.io.load_image_text`."""
    from .text.io import load_image_text as _load  # lazy: tokenizers are imported only when needed

    return _load(source, tokenizer=tokenizer, device=device, strict=strict, **hints)


def save_pretrained(model: ViT, directory, **kwargs: Any):
    """Write ``config.json`` + ``model.safetensors`` (no pickle); see :func:`vitkit.io.save_pretrained`.
    Also a method: ``model.save_pretrained(directory)``."""
    return _save_pretrained(model, directory, **kwargs)


def export_to(model: ViT, format: str, path, **kwargs: Any):
    """Export to "timm" | "hf" | "torchvision" | "jax" | "onnx" | "torchscript" | "vitkit"; see
    :mod:`vitkit.interop.export`. Also a method: ``model.export_to(format, path)``."""
    from .interop.export import export_to as _export  # lazy: peers are imported only when needed

    return _export(model, format, path, **kwargs)


def _save_pretrained_method(self: ViT, directory, **kwargs: Any):
    return save_pretrained(self, directory, **kwargs)


def _export_to_method(self: ViT, format: str, path, **kwargs: Any):
    return export_to(self, format, path, **kwargs)


# The model module imports nothing from io/interop (no cycle); the package, which imports both
# sides, gives ViT its two persistence methods as thin delegations.
_save_pretrained_method.__doc__ = save_pretrained.__doc__
_export_to_method.__doc__ = export_to.__doc__
ViT.save_pretrained = _save_pretrained_method  # type: ignore[attr-defined]


def _save_image_text_method(self, directory, **kwargs: Any):
    """Write vitkit's image-text directory (the image part as ``save_pretrained`` writes it, plus the
    text tower and tokenizer); see :func:`vitkit.text.io.save_image_text`."""
    from .text.io import save_image_text

    return save_image_text(self, directory, **kwargs)


ImageTextModel.save_pretrained = _save_image_text_method  # type: ignore[attr-defined]
ViT.export_to = _export_to_method  # type: ignore[attr-defined]
# ``model.preprocess_cfg`` accepts a dict (or None, or a Preprocess) and stores a validated
# Preprocess; attached here like the methods above so the model package stays torch-only.
ViT.preprocess_cfg = preprocess_property()  # type: ignore[attr-defined]

__all__ = [
    "ViT", "ViTConfig", "TextConfig", "load_image_text", "PRESETS", "create_model", "list_models", "get_config", "resolve_name", "load_model",
    "Preprocess", "from_pretrained", "save_pretrained", "export_to", "VitkitError", "ConfigError", "InputError", "CheckpointError", "__version__",
]

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
from .model.vit import ViT
from .preprocess import Preprocess

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


def load_model(directory, **kwargs: Any) -> ViT:
    """Rebuild a ViT from a directory written by ``model.save_pretrained`` (or a training run); see
    :func:`vitkit.interop.load.load_model`."""
    from .interop.load import load_model as _load_model  # lazy: the format modules load on first use

    return _load_model(directory, **kwargs)


def save_pretrained(model: ViT, directory, **kwargs: Any):
    """``model.save_pretrained(directory)``: vitkit's own directory (config.json + model.safetensors)."""
    return model.save_pretrained(directory, **kwargs)


def export_to(model: ViT, format: str, path, **kwargs: Any):
    """``model.export_to(format, path)``: any format of the registry that writes."""
    return model.export_to(format, path, **kwargs)


__all__ = [
    "ViT", "ViTConfig", "TextConfig", "load_image_text", "PRESETS", "create_model", "list_models", "get_config", "resolve_name", "load_model",
    "Preprocess", "from_pretrained", "save_pretrained", "export_to", "VitkitError", "ConfigError", "InputError", "CheckpointError", "__version__",
]

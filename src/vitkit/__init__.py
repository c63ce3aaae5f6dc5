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

from .config import PRESETS, ViTConfig, get_config, list_models, resolve_name
from .errors import CheckpointError, ConfigError, InputError, VitkitError
from .io import load_model
from .model.vit import ViT

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


__all__ = [
    "ViT", "ViTConfig", "PRESETS", "create_model", "list_models", "get_config", "resolve_name", "load_model",
    "from_pretrained", "VitkitError", "ConfigError", "InputError", "CheckpointError", "__version__",
]

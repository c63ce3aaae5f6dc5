"""ImageNet-1k class names (the 1000 labels of the ILSVRC-2012 classifier heads), in index order.

Taken at runtime from torchvision's weight metadata (bundled with torchvision, no download), so
vitkit does not carry its own copy of the list."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


def default_labels(num_classes: int) -> list[str] | None:
    """ImageNet-1k names for a 1000-class head, None otherwise (no guessing)."""
    return imagenet_labels() if num_classes == 1000 else None

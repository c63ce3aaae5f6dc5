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


def output_names(model) -> list[str]:
    """One name per output of a regression (or other non-classification) head: the target names
    saved with the model (``labels``, or ``pretrained_info["targets"]`` as ``vitkit train`` writes
    them), else ``output i``."""
    n = model.config.num_classes
    info = getattr(model, "pretrained_info", None) or {}
    for names in (getattr(model, "labels", None), info.get("targets")):
        if names and len(names) == n:
            return [str(x) for x in names]
    return [f"output {i}" for i in range(n)]

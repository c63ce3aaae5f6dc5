"""Datasets and image loading."""

from .image import builtin_image, load_image

__all__ = ["load_image", "builtin_image"]

"""Load and save ViT weights from and to the formats people have: vitkit's own, timm, Hugging
Face transformers, torchvision, Google's JAX ``.npz`` (vision_transformer and big_vision), the
original DINOv2 / DINOv3 and OpenAI / OpenCLIP state dicts, and hub ids; for the ViT families
(:mod:`vitkit.interop.families`). The formats are one registry, :mod:`vitkit.interop.formats`
(one module per format, each exporting one ``FORMAT``). One entry point, :func:`from_pretrained`,
which detects the format, says what it found, builds the model from the checkpoint's own config
(or from its tensor shapes), loads every tensor through a strict name-and-shape check, and
attaches preprocessing and labels (:mod:`vitkit.interop.load`).

    model = vitkit.from_pretrained("vit_base_patch16_224.pth")          # timm state dict
    model = vitkit.from_pretrained("google/vit-base-patch16-224")       # hub id (cached)
    model = vitkit.from_pretrained("ckpt.npz", image_size=384)          # JAX, pos table resampled
    model.export_to("onnx", "vit.onnx")
"""

from __future__ import annotations

from .common import LoadReport
from .formats import READ_FORMATS, detect_format, resolve_model_dir
from .load import from_pretrained, load_model, model_from_converted, read_pretrained

FORMATS = READ_FORMATS  # the names of the formats vitkit reads (the registry: vitkit.interop.formats.REGISTRY)

__all__ = ["from_pretrained", "read_pretrained", "model_from_converted", "load_model",
           "detect_format", "resolve_model_dir", "LoadReport", "FORMATS"]

"""Hand a model back: ``export_to(model, format, path)``.

* ``"vitkit"``: vitkit's own directory (config.json + model.safetensors).
* ``"timm"``: a timm hub-style directory (config.json with architecture / model_args /
  pretrained_cfg + model.safetensors); ``timm.models.VisionTransformer(**model_args)`` loads it.
* ``"hf"``: a transformers ViT directory (``ViTForImageClassification`` or ``ViTModel``, legacy
  file key names, preprocessor_config.json).
* ``"torchvision"``: a safetensors state dict in torchvision's names.
* ``"jax"``: a ``.npz`` in the vision_transformer layout (``layout="big_vision"`` for the other).
* ``"dinov2"``: the original facebookresearch/dinov2 hub state dict (safetensors).
* ``"openai_clip"``: an OpenAI / OpenCLIP ``visual.*`` state dict (safetensors).
* ``"onnx"``: an ONNX graph, opset >= 17, dynamic batch axis, input ``pixel_values``
  (B, C, H, W) -> output ``logits``. Needs the ``onnx`` package (and onnxscript for the
  torch.export-based exporter; the TorchScript-based one is used when that is missing).
* ``"torchscript"``: ``torch.jit.trace`` of the eval model (fused attention path), ``.pt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .formats import WRITE_FORMATS as EXPORT_FORMATS  # the one registry

log = logging.getLogger("vitkit.interop")
__all__ = ["export_to", "export_onnx", "export_torchscript", "EXPORT_FORMATS"]


class _Logits(torch.nn.Module):
    """Wrapper so traced / exported graphs have one tensor in and one out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixel_values))


def _example(model, batch: int = 2) -> torch.Tensor:
    c = model.config
    dev = next(model.parameters()).device
    return torch.randn(batch, c.in_channels, *c.image_hw, device=dev)


def export_onnx(model, path: str | Path, opset: int = 18, dynamic_batch: bool = True) -> Path:
    if opset < 17:
        raise ConfigError(f"opset must be >= 17 (LayerNormalization is an op from 17), got {opset}")
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ConfigError("ONNX export needs the onnx package: pip install 'vitkit[onnx]'") from e
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Logits(model).eval()
    x = _example(model)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        import onnxscript  # noqa: F401

        dyn = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
        prog = torch.onnx.export(wrapped, (x,), input_names=["pixel_values"], output_names=["logits"],
                                 opset_version=opset, dynamic_shapes=dyn, dynamo=True, verbose=False)
        prog.save(str(tmp))
    except ImportError:
        dyn_axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(wrapped, (x,), str(tmp), input_names=["pixel_values"], output_names=["logits"],
                          opset_version=opset, dynamic_axes=dyn_axes, dynamo=False)
    tmp.replace(p)
    for extra in p.parent.glob(f".{p.name}.tmp*"):
        extra.unlink(missing_ok=True)
    return p


def export_torchscript(model, path: str | Path) -> Path:
    import warnings

    from ..io import atomic_write

    wrapped = _Logits(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # input checks are Python branches on shapes; they are constant for a fixed image size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapped, (_example(model),), check_trace=False)
    def save(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, tmp)

    return atomic_write(path, save)


def export_to(model, format: str, path: str | Path, **kw: Any) -> Path:
    """Write ``model`` in ``format`` to ``path`` (a directory for vitkit/timm/hf, a file else)."""
    from .formats import canonical

    fmt = canonical(format, writing=True)
    if getattr(getattr(model, "config", None), "rope", "none") != "none" and fmt not in ("vitkit", "onnx", "torchscript"):
        raise ConfigError(f"this model uses rotary position embedding (rope={model.config.rope!r}, DINOv3), which the "
                          f"{fmt} layout vitkit writes has no place for; export to vitkit, onnx or torchscript")
    was_training = model.training
    model.eval()
    try:
        if fmt == "vitkit":
            out = model.save_pretrained(path)
        elif fmt == "timm":
            from .timm import export

            out = export(model, path)
        elif fmt == "hf":
            from .hf import export

            out = export(model, path)
        elif fmt == "torchvision":
            from ..io import save_state_dict
            from .torchvision import export_state_dict

            out = save_state_dict(export_state_dict(model), path)
        elif fmt == "jax":
            from .jax import export_npz

            out = export_npz(model, path, layout=kw.get("layout", "vision_transformer"))
        elif fmt == "onnx":
            out = export_onnx(model, path, opset=int(kw.get("opset", 18)), dynamic_batch=kw.get("dynamic_batch", True))
        elif fmt == "torchscript":
            out = export_torchscript(model, path)
        else:  # a registered format whose module has export(model, path): dinov2, openai_clip
            from importlib import import_module

            from .formats import FORMATS

            out = import_module(f"vitkit.interop.{FORMATS[fmt].module}").export(model, path)
    finally:
        model.train(was_training)
    log.info("exported %s model to %s", fmt, out)
    return Path(out)

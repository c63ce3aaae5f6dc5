"""Graph formats vitkit writes (and does not read): ONNX and TorchScript, both of
``forward_head(forward_features(pixel_values))`` in eval mode.

* ``"onnx"``: an ONNX graph, opset >= 17, dynamic batch axis, input ``pixel_values``
  (B, C, H, W) -> output ``logits``. Needs the ``onnx`` package (and onnxscript for the
  torch.export-based exporter; the TorchScript-based one is used when that is missing).
* ``"torchscript"``: ``torch.jit.trace`` of the eval model (fused attention path), ``.pt``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import atomic_write
from .source import Format


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


def check_onnx_export(opset) -> int:
    """The opset as an int, refused below 17 (LayerNormalization), and the onnx package there; shared
    by every ONNX export (images here, text towers in vitkit.text.io)."""
    opset = int(opset)
    if opset < 17:
        raise ConfigError(f"opset must be >= 17 (LayerNormalization is an op from 17), got {opset}")
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ConfigError("ONNX export needs the onnx package: pip install 'vitkit[onnx]'") from e
    return opset


def export_onnx(model, path: str | Path, opset: int = 18, dynamic_batch: bool = True) -> Path:
    opset = check_onnx_export(opset)
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




ONNX = Format("onnx", "ONNX graph (pixel_values -> output)", write=export_onnx, suffix=".onnx",
              options=("opset", "dynamic_batch"), writes_rope=True)
TORCHSCRIPT = Format("torchscript", "torch.jit.trace of the eval model", aliases=("jit",), write=export_torchscript,
                     suffix=".pt", writes_rope=True)

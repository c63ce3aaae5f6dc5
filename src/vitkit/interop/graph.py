"""Graph formats vitkit writes (and does not read): ONNX and TorchScript, both of
``forward_head(forward_features(pixel_values))`` in eval mode.

* ``"onnx"``: an ONNX graph, opset >= 17, dynamic batch axis, input ``pixel_values``
  (B, C, H, W) -> output ``logits``. A model that takes any size (``dynamic_img_size``) gets
  dynamic height and width too (axes ``ph*grid_h`` / ``pw*grid_w``: multiples of the patch), its
  position table resampled inside the graph as the source does. Needs the ``onnx`` package (and
  onnxscript for the torch.export-based exporter; the TorchScript-based one is used when that is
  missing, with fixed height and width: tracing freezes the grid).
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


def _example(model, batch: int = 2, grow: int = 0) -> torch.Tensor:
    """An input batch at the model's size, ``grow`` patches taller and wider."""
    c = model.config
    dev = next(model.parameters()).device
    (H, W), (ph, pw) = c.image_hw, c.patch_hw
    return torch.randn(batch, c.in_channels, H + grow * ph, W + grow * pw, device=dev)


# resamplings whose graph keeps fixed sizes (checked in onnxruntime): the original DINOv2's scale
# factor (g + 0.1) / M becomes a constant, and vit_jax's float64 Resize has no onnxruntime kernel
_FIXED_HW_RESAMPLES = ("dinov2", "vit_jax")


def dynamic_hw(model) -> bool:
    """Whether the ONNX graph gets dynamic height and width: the model takes any size, and its
    table (if learned) is resampled in a way that exports with symbolic sizes (else a warning)."""
    c = model.config
    if not c.dynamic_img_size:
        return False
    if c.pos_embed == "learned" and c.pos_resample in _FIXED_HW_RESAMPLES:
        warnings.warn(f"ONNX export at fixed {c.image_hw[0]}x{c.image_hw[1]}: the {c.pos_resample!r} position "
                      "resampling does not export with symbolic sizes; export at another size with "
                      "model.set_image_size first", stacklevel=3)
        return False
    return True


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


def refuse_naflex(model, what: str) -> None:
    """ConfigError for a NaFlex model: its input (patches of each image at its own grid, packed with a
    mask, the table resampled per image) is no (B, C, H, W) tensor, and a graph of plain images would
    silently drop it."""
    n = getattr(model.config, "naflex_max_patches", None)
    if n:
        raise ConfigError(f"{what} export of a NaFlex model (naflex_max_patches={n}): a graph takes one (B, C, H, W) "
                          "tensor, not NaFlex input (each image's patches at its own grid, packed with a mask, the "
                          "position table resampled per image: sizes that depend on the data); a graph of plain "
                          "images needs the model rebuilt with naflex_max_patches=None")


def export_onnx(model, path: str | Path, opset: int = 18, dynamic_batch: bool = True) -> Path:
    refuse_naflex(model, "ONNX")
    opset = check_onnx_export(opset)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Logits(model).eval()
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        import onnxscript  # noqa: F401

        Dim = torch.export.Dim
        axes = {0: Dim("batch", min=1, max=4096)} if dynamic_batch else {}
        hw = dynamic_hw(model)
        if hw:
            ph, pw = model.config.patch_hw
            axes.update({2: ph * Dim("grid_h", min=1, max=1024), 3: pw * Dim("grid_w", min=1, max=1024)})
        # a dynamic model is traced off its own grid: at that grid it adds its table as is, a branch
        # the graph would keep for every size; off it, the resampling is in the graph
        x = _example(model, grow=1 if hw else 0)
        prog = torch.onnx.export(wrapped, (x,), input_names=["pixel_values"], output_names=["logits"],
                                 opset_version=opset, dynamic_shapes={"pixel_values": axes} if axes else None,
                                 dynamo=True, verbose=False)
        prog.save(str(tmp))
    except ImportError:
        dyn_axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(wrapped, (_example(model),), str(tmp), input_names=["pixel_values"],
                          output_names=["logits"], opset_version=opset, dynamic_axes=dyn_axes, dynamo=False)
    tmp.replace(p)
    for extra in p.parent.glob(f".{p.name}.tmp*"):
        extra.unlink(missing_ok=True)
    return p


def export_torchscript(model, path: str | Path) -> Path:
    refuse_naflex(model, "TorchScript")
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

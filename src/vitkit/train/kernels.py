"""CPU training kernels beside the model: fp32 ``F.linear`` on oneDNN.

On x86 CPUs torch's ``F.linear`` is MKL's sgemm (``addmm``; its backward ``mm``), the kernel timm
runs too. oneDNN's matmul, which torch also ships, is faster on this project's CPU (AMD EPYC Zen 4,
2 threads) at ViT shapes: 5-19% for the forward and the input gradient at ViT-S widths, on operands
that change every call; for the weight gradient only where the layer narrows (in > out, the MLP's
second layer), MKL elsewhere; below 128 features not at all (measured per shape, BENCHMARKS.md
"Training step"). A whole ViT-S/16 or ViT-B/16 fp32 training step measured ~3-4% faster with it
than with ``F.linear`` (1.09 -> 1.12-1.15x timm's step).

:func:`onednn_linear` is a context in which ``F.linear`` calls on fp32 CPU tensors (outside
autocast, layers at least :data:`MIN_FEATURES` wide) run :class:`OneDNNLinearFn` instead; the
model's forward is untouched (one forward per module), and so are its parameters and state dict.
Results equal ``F.linear``'s to float rounding (another summation order), not bit for bit.
Not for models under activation checkpointing: its recomputation runs in the backward pass, outside
the context, with the other kernel (torch.utils.checkpoint then refuses the mismatch), so the
trainer keeps ``F.linear`` there.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from ..infer.engine import packed_available

# Narrower layers stay on F.linear: at 32-128 features oneDNN's weight gradient measured 2-4x
# slower than MKL's and its forward no faster (BENCHMARKS.md); the digits models live there.
MIN_FEATURES = 128


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` on oneDNN (x 2-D; w may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class OneDNNLinearFn(torch.autograd.Function):
    """``F.linear(x, w, b)`` with the forward and the input gradient on oneDNN, the weight gradient
    on oneDNN where the layer narrows (in > out) and on MKL's ``mm`` otherwise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, b is not None
        return _onednn_linear(x2, w.contiguous(), b).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x2, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(g2, w.t(), None).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = _onednn_linear(g2.t(), x2.t(), None) if w.shape[1] > w.shape[0] else g2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def routes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether :func:`onednn_linear` sends this ``F.linear`` call to oneDNN: plain, non-empty fp32 CPU
    tensors (no tensor subclass such as FSDP's DTensor), a 2-D weight at least :data:`MIN_FEATURES` wide
    both ways, CPU autocast off."""
    return (type(x) in _PLAIN and type(w) in _PLAIN and (b is None or type(b) in _PLAIN)
            and x.device.type == "cpu" and w.device.type == "cpu" and x.dim() >= 1 and x.numel() > 0 and w.dim() == 2
            and x.dtype == w.dtype == torch.float32 and (b is None or b.dtype == torch.float32)
            and min(w.shape) >= MIN_FEATURES and not torch.is_autocast_enabled("cpu"))


class _OneDNNLinearMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.routed = 0  # F.linear calls sent to oneDNN (tests and the trainer's note read it)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and routes(x, w, b):
                self.routed += 1
                return OneDNNLinearFn.apply(x, w, b)
        return func(*args, **kwargs)


def available() -> bool:
    """oneDNN's matmul is there and was measured to pay: torch built with oneDNN, on x86-64."""
    return packed_available()


@contextlib.contextmanager
def onednn_linear(enabled: bool = True):
    """Within the block, fp32 CPU ``F.linear`` calls that :func:`routes` accepts run on oneDNN
    (forward here, backward whenever autograd runs it). Yields the mode (``.routed`` counts the
    calls routed), or None where disabled or oneDNN is not available (then nothing changes)."""
    if not (enabled and available()):
        yield None
        return
    with _OneDNNLinearMode() as mode:
        yield mode

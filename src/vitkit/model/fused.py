"""Fused CPU inference kernels (oneDNN), used automatically where they are exact enough.

On CPU in fp32, a ViT block spends ~10% of its inference time in memory-bound passes after the
matrix multiplies: GELU over the (B, N, 4D) MLP activations, and the two residual additions. The
oneDNN matmul applies these as *post-ops* while the result is still in cache. PyTorch exposes them
as ``torch.ops.mkldnn._linear_pointwise`` (the kernels Inductor emits for CPU); we call them
directly, so the speed-up needs no ``torch.compile``.

When: only under ``torch.inference_mode()`` (predict, eval, bench use it), on CPU, fp32, when the
op exists in this torch build, and never while tracing/compiling. Elsewhere (training, autograd,
``torch.no_grad``, export) the reference aten path runs. Results differ from the reference path
by float rounding only (~1e-6 per op; tests pin it). ``VITKIT_FUSED_CPU=0`` or
:func:`set_fused_cpu` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

_enabled = os.environ.get("VITKIT_FUSED_CPU", "1") != "0"

# activation name -> (oneDNN post-op, algorithm)
_ACTS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "none")}


def set_fused_cpu(enabled: bool) -> None:
    """Turn the fused CPU inference path on or off for this process."""
    global _enabled
    _enabled = bool(enabled)


@functools.lru_cache(maxsize=1)
def fused_cpu_available() -> bool:
    """True when this torch build has oneDNN's linear post-op kernels and they compute correctly."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
        with torch.inference_mode():
            ok = torch.allclose(op(x, w, b, "gelu", [None], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5)
            ok &= torch.allclose(op.binary(x, x[:, :4], w, b, "add"), F.linear(x, w, b) + x[:, :4], atol=1e-5)
        return bool(ok)
    except (AttributeError, RuntimeError):
        return False


def use_fused(x: torch.Tensor) -> bool:
    return (
        _enabled
        and torch.is_inference_mode_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and fused_cpu_available()
    )


def linear_act(x: torch.Tensor, linear: nn.Linear, act_name: str, act: nn.Module) -> torch.Tensor:
    """act(linear(x)), one oneDNN call when possible."""
    if act_name in _ACTS and use_fused(x):
        attr, algo = _ACTS[act_name]
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, attr, [None], algo)
    return act(linear(x))


def linear_add(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), one oneDNN call when possible."""
    if use_fused(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, linear.weight, linear.bias, "add")
    return residual + linear(x)

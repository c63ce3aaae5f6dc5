"""Encoder block and its parts: activations, norms, MLPs (plain and SwiGLU), stochastic depth,
LayerScale, and the block itself, assembled from parts the config chooses (as timm's ``Block``).

Pre-norm (paper, Eq. 2-3):   x = x + attn(norm1(x));  x = x + mlp(norm2(x))
Post-norm (original Transformer, the Keras tutorial):   x = norm1(x + attn(x));  x = norm2(x + mlp(x))

Input (B, N, D) -> output (B, N, D); with ``num_queries=k`` -> (B, k, D), the first k tokens.

:func:`run_blocks` is the one loop over a stack of blocks (image and text towers, the
Predictor's engine), collecting what each caller asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ACTIVATIONS, MLP_LAYERS, NORM_LAYERS
from ..errors import ConfigError
from .attention import Attention


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The module of each name in vitkit.config.ACTIVATION_NAMES (the one table of activation names;
# a test checks both list the same names).
ACT_MODULES = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_act(name: str) -> nn.Module:
    """Activation module by name (:data:`vitkit.config.ACTIVATION_NAMES`)."""
    if name not in ACT_MODULES:
        raise ConfigError(f"unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
    return ACT_MODULES[name]()


def make_norm(name: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """"layernorm" (weight and bias) or "rmsnorm" (weight only: x / rms(x) * weight)."""
    if name == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if name == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ConfigError(f"unknown norm_layer {name!r}; expected one of {list(NORM_LAYERS)}")


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout. (B, N, D) -> (B, N, D).

    The warm-up MLP of tutorial 1 forgets to feed the hidden layer's output onward; here the
    hidden activation is the input of fc2, and a test checks that fc1 influences the output.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0, bias: bool = True,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = make_act(act)
        self.norm = norm  # on the hidden activation before fc2 (EVA-02's scale_mlp), None = off
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(drop) if drop > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mlp_out(self, self.act(self.fc1(x)))  # (B, N, hidden): the hidden output feeds fc2


def _mlp_out(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The hidden activation (B, N, hidden) -> dropout -> norm (if any) -> fc2 -> dropout."""
    if mlp.drop is not None:
        h = mlp.drop(h)
    if mlp.norm is not None:
        h = mlp.norm(h)
    out = mlp.fc2(h)
    return mlp.drop(out) if mlp.drop is not None else out


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020) with a packed first layer: fc1 (D -> 2*hidden) holds
    [gate; value] and ``h = silu(gate) * value``, then fc2 (hidden -> D).

    The packing is timm's ``SwiGLUPacked`` (``GluMlp(gate_last=False)``: the activation takes the
    *first* half) and DINOv2's ``SwiGLUFFNFused`` (``w12`` = fc1, ``w3`` = fc2), so both load
    1:1. ``hidden_dim`` is the gated width (fc2's input); timm's ``hidden_features`` /
    ``mlp_ratio`` count fc1's output, twice that.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, bias: bool = True,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.act = nn.SiLU()
        self.norm = norm  # on the gated activation before fc2 (EVA-02's scale_mlp), None = off
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(drop) if drop > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return _mlp_out(self, self.act(gate) * value)


def make_mlp(name: str, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0,
             bias: bool = True, norm: nn.Module | None = None) -> nn.Module:
    """"mlp" (:class:`Mlp` with ``act``) or "swiglu" (:class:`SwiGLU`, always a SiLU gate); ``bias``
    on every linear of it; ``norm`` on the hidden activation before fc2."""
    if name == "mlp":
        return Mlp(dim, hidden_dim, act=act, drop=drop, bias=bias, norm=norm)
    if name == "swiglu":
        return SwiGLU(dim, hidden_dim, drop=drop, bias=bias, norm=norm)
    raise ConfigError(f"unknown mlp_layer {name!r}; expected one of {list(MLP_LAYERS)}")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (Touvron et al. 2021, CaiT), init ``init_value``."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """One Transformer encoder block.

    Args:
        dim, num_heads, hidden_dim: widths.
        qkv_bias, qk_scale, attn_drop, proj_drop: see :class:`Attention`.
        act: MLP activation name (the plain MLP's; SwiGLU gates with SiLU).
        norm_eps: norm epsilon.
        drop_path: stochastic-depth rate of this block.
        layer_scale: LayerScale init value, None = off.
        norm_first: pre-norm (True) or post-norm (False).
        norm_layer: "layernorm" | "rmsnorm".
        mlp_layer: "mlp" | "swiglu".
        proj_bias: bias of the attention output projection and of the MLP's linears (timm's
            ``proj_bias``, which its Block also passes to the MLP; AIMv2 has none).
        mlp_norm, attn_norm: a norm inside the MLP before fc2 / on the attention output before
            its projection (EVA-02's scale_mlp / scale_attn_inner).
        rope_interleaved: the rotary tables' pair layout (vitkit.model.rope.INTERLEAVED).
    """

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 act: str = "gelu", norm_eps: float = 1e-6, drop_path: float = 0.0,
                 layer_scale: float | None = None, norm_first: bool = True, norm_layer: str = "layernorm",
                 mlp_layer: str = "mlp", proj_bias: bool = True, mlp_norm: bool = False, attn_norm: bool = False,
                 rope_interleaved: bool = False) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = make_norm(norm_layer, dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=proj_drop, proj_bias=proj_bias, rope_interleaved=rope_interleaved,
                              norm=make_norm(norm_layer, dim, norm_eps) if attn_norm else None)
        # Optional pieces are None when off (not Identity): the hot path then makes no call at all.
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else None
        self.norm2 = make_norm(norm_layer, dim, norm_eps)
        self.mlp = make_mlp(mlp_layer, dim, hidden_dim, act=act, drop=proj_drop, bias=proj_bias,
                            norm=make_norm(norm_layer, hidden_dim, norm_eps) if mlp_norm else None)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else None

    @staticmethod
    def _branch(y: torch.Tensor, ls: LayerScale | None, dp: DropPath | None) -> torch.Tensor:
        if ls is not None:
            y = ls(y)
        if dp is not None:
            y = dp(y)
        return y

    def forward(self, x: torch.Tensor, num_queries: int | None = None, return_attention: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, attn_mask: torch.Tensor | None = None):
        """(B, N, D) -> (B, N, D) [, attention (B, heads, N, N)]; ``rope``, ``attn_mask``: see Attention.

        ``num_queries=k``: this block's output for the first k tokens only, (B, k, D) (what a
        class-token head reads from the last block). Every token still serves as a key and
        value; the queries, output projection, residuals, the norms after attention and the MLP
        run for those k tokens alone. Same math as ``forward(x)[:, :k]``."""
        h = self.norm1(x) if self.norm_first else x
        if return_attention:
            a, attn_w = self.attn(h, num_queries=num_queries, return_attention=True, rope=rope, attn_mask=attn_mask)
        else:
            a = self.attn(h, num_queries=num_queries, rope=rope, attn_mask=attn_mask)
        a = self._branch(a, self.ls1, self.drop_path1)
        if num_queries is not None:
            x = x[:, :num_queries]
        if self.norm_first:
            x = x + a
            x = x + self._branch(self.mlp(self.norm2(x)), self.ls2, self.drop_path2)
        else:
            x = self.norm1(x + a)
            x = self.norm2(x + self._branch(self.mlp(x), self.ls2, self.drop_path2))
        return (x, attn_w) if return_attention else x


class BlockOutputs(NamedTuple):
    """What :func:`run_blocks` collected."""

    tokens: torch.Tensor  # after the last block run (B, T, D); (B, k, D) with last_queries=k
    hidden: dict[int, torch.Tensor]  # block index -> its output (B, T, D), for the indices in ``keep``
    attentions: list[torch.Tensor]  # one (B, heads, T, T) per block run, with ``attention=True``


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
               attn_mask: torch.Tensor | None = None, last_queries: int | None = None, keep: Collection[int] = (),
               stop: int | None = None, attention: bool = False, checkpointing: bool = False,
               block: Callable[[int, torch.Tensor, int | None], torch.Tensor] | None = None) -> BlockOutputs:
    """The one loop over the blocks: tokens (B, T, D) entering block 0 through ``blocks``.

    Args:
        rope, attn_mask: passed to every block (see :class:`Attention`); ``rope`` may be a list
            with one (cos, sin) per block (mixed RoPE's learned per-block frequencies).
        last_queries: k: the last block computes the first k tokens' outputs alone, (B, k, D)
            (what a class-token head reads; see ``Block.forward``'s ``num_queries``).
        keep: block indices whose outputs to return in ``hidden``.
        stop: the index of the last block to run (default: every block).
        attention: also return each block's attention weights (the explicit softmax path).
        checkpointing: activation checkpointing of every block while gradients are enabled
            (``torch.utils.checkpoint``, non-reentrant: same gradients, masks replayed).
        block: ``block(i, x, num_queries) -> x`` instead of calling ``blocks[i]`` (the
            Predictor's engine: the same walk with buffer-reusing kernels).
    """
    depth = len(blocks)
    end = depth if stop is None else stop + 1
    checkpointing = checkpointing and torch.is_grad_enabled()
    hidden: dict[int, torch.Tensor] = {}
    attentions: list[torch.Tensor] = []
    for i in range(end):
        k = last_queries if i == depth - 1 else None
        r = rope[i] if isinstance(rope, list) else rope
        if block is not None:
            x = block(i, x, k)
        elif checkpointing:
            x = checkpoint(blocks[i], x, k, attention, r, attn_mask, use_reentrant=False)
        else:
            x = blocks[i](x, k, attention, r, attn_mask)
        if attention:
            x, a = x
            attentions.append(a)
        if i in keep:
            hidden[i] = x
    return BlockOutputs(x, hidden, attentions)

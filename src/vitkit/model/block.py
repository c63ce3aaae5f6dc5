"""Encoder block pieces: activations, MLP, stochastic depth, LayerScale, and the block itself.

Pre-norm (paper, Eq. 2-3):   x = x + attn(norm1(x));  x = x + mlp(norm2(x))
Post-norm (original Transformer, the Keras tutorial):   x = norm1(x + attn(x));  x = norm2(x + mlp(x))

Input (B, N, D) -> output (B, N, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ACTIVATIONS
from ..errors import ConfigError
from .attention import Attention, Workspace, linear_into


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """Activation module by name; "gelu" is the exact (erf) GELU, "gelu_tanh" the tanh one."""
    table = {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": lambda: nn.ReLU(),
        "quick_gelu": lambda: QuickGELU(),
        "silu": lambda: nn.SiLU(),
        "tanh": lambda: nn.Tanh(),
        "identity": lambda: nn.Identity(),
    }
    if name not in table:
        raise ConfigError(f"unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
    return table[name]()


def act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an activation module in place (inference only: autograd needs the input)."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    if isinstance(act, nn.SiLU):
        return F.silu(x, inplace=True)
    if isinstance(act, nn.Tanh):
        return x.tanh_()
    if isinstance(act, nn.Identity):
        return x
    return x.copy_(act(x))


def layer_norm_into(norm: nn.Module, x: torch.Tensor, ws: Workspace, name: str = "norm") -> torch.Tensor:
    """``norm(x)`` for (B, N, D) x, into a workspace buffer when ``norm`` is a plain LayerNorm
    (the same ``native_layer_norm`` kernel ``F.layer_norm`` runs on the CPU)."""
    if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and len(norm.normalized_shape) == 1):
        return norm(x)
    B, N, D = x.shape
    out, _, _ = torch.ops.aten.native_layer_norm.out(
        x, [D], norm.weight, norm.bias, norm.eps,
        out0=ws.get(name, B, N, D), out1=ws.get(name + ".mean", B, N, 1), out2=ws.get(name + ".rstd", B, N, 1))
    return out


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout. (B, N, D) -> (B, N, D).

    The warm-up MLP of tutorial 1 forgets to feed the hidden layer's output onward; here the
    hidden activation is the input of fc2, and a test checks that fc1 influences the output.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))  # (B, N, hidden): the hidden output feeds fc2
        if self.drop is not None:
            return self.drop(self.fc2(self.drop(h)))
        return self.fc2(h)

    def forward_into(self, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Inference: (B, N, D) -> (B*N, D) workspace buffer "out"; the hidden layer is one
        reused buffer, activated in place."""
        B, N, D = x.shape
        h = linear_into(self.fc1, x.reshape(B * N, D), ws.get("hidden", B * N, self.fc1.out_features))
        return linear_into(self.fc2, act_(self.act, h), ws.get("out", B * N, self.fc2.out_features))


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
        act: MLP activation name.
        norm_eps: LayerNorm epsilon.
        drop_path: stochastic-depth rate of this block.
        layer_scale: LayerScale init value, None = off.
        norm_first: pre-norm (True) or post-norm (False).
    """

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 act: str = "gelu", norm_eps: float = 1e-6, drop_path: float = 0.0,
                 layer_scale: float | None = None, norm_first: bool = True) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        # Optional pieces are None when off (not Identity): the hot path then makes no call at all.
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_dim, act=act, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else None

    @staticmethod
    def _branch(y: torch.Tensor, ls: LayerScale | None, dp: DropPath | None) -> torch.Tensor:
        if ls is not None:
            y = ls(y)
        if dp is not None:
            y = dp(y)
        return y

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        attn_w = None
        h = self.norm1(x) if self.norm_first else x
        if return_attention:
            a, attn_w = self.attn(h, return_attention=True)
        else:
            a = self.attn(h)
        a = self._branch(a, self.ls1, self.drop_path1)
        if self.norm_first:
            x = x + a
            x = x + self._branch(self.mlp(self.norm2(x)), self.ls2, self.drop_path2)
        else:
            x = self.norm1(x + a)
            x = self.norm2(x + self._branch(self.mlp(x), self.ls2, self.drop_path2))
        return (x, attn_w) if return_attention else x

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, 1, D): this block's output for token 0 only (what a class-token head
        reads from the last block). Every token still serves as a key and value; the query, the
        output projection, the residuals, the norms after attention and the MLP run for token 0
        alone. Same math as ``forward(x)[:, :1]``, about 1/6 of the block's cost at 197 tokens."""
        h = self.norm1(x) if self.norm_first else x
        a = self._branch(self.attn.forward_first_query(h), self.ls1, self.drop_path1)
        x0 = x[:, :1]
        if self.norm_first:
            x0 = x0 + a
            return x0 + self._branch(self.mlp(self.norm2(x0)), self.ls2, self.drop_path2)
        x0 = self.norm1(x0 + a)
        return self.norm2(x0 + self._branch(self.mlp(x0), self.ls2, self.drop_path2))

    def forward_into(self, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Inference (eval mode, no autograd): update the residual stream ``x`` (B, N, D,
        contiguous, owned by the caller) in place and return it.

        Same kernels, same order, same results as :meth:`forward` (tested bit-exact); the
        branch outputs land in reused workspace buffers and are added into ``x`` in place, so a
        block allocates only the attention kernel's output."""
        B, N, D = x.shape
        flat = x.view(B * N, D)
        h = layer_norm_into(self.norm1, x, ws) if self.norm_first else x
        a = self.attn.forward_into(h, ws)
        if self.ls1 is not None:
            a.mul_(self.ls1.gamma)
        flat.add_(a)
        if not self.norm_first:
            x.copy_(layer_norm_into(self.norm1, x, ws))
        h = layer_norm_into(self.norm2, x, ws) if self.norm_first else x
        m = self.mlp.forward_into(h, ws)
        if self.ls2 is not None:
            m.mul_(self.ls2.gamma)
        flat.add_(m)
        if not self.norm_first:
            x.copy_(layer_norm_into(self.norm2, x, ws))
        return x

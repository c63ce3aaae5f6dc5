"""Patch embedding: image (B, C, H, W) -> tokens (B, N, D), N = (H/ph) * (W/pw).

The paper (Dosovitskiy et al. 2021, Eq. 1) flattens each P x P x C patch and multiplies it by a
learned matrix E. That is exactly a ``Conv2d(C, D, kernel=stride=P)``; the tutorials also write it
as ``nn.Unfold`` + ``Linear`` and as an einops ``rearrange`` + ``Linear``. All three are here, over
*one* parameter (the conv weight, shape (D, C, ph, pw)), so they give the same tokens from the same
weights and any checkpoint loads into any of them. The convolution is the fastest and the default.

Trap recorded: ``nn.Unfold`` flattens a patch in (c, ph, pw) order, the einops pattern
``b c (h p1) (w p2) -> b (h w) (p1 p2 c)`` in (ph, pw, c) order. A Linear weight from one layout
must be permuted to be used with the other: :func:`linear_to_conv_weight` names the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import to_2tuple
from ..errors import ConfigError, InputError


def linear_to_conv_weight(weight: torch.Tensor, in_channels: int, patch_size, order: str) -> torch.Tensor:
    """Turn a (D, P*P*C) patch-projection matrix into a conv kernel (D, C, ph, pw).

    ``order`` is how the patch was flattened: ``"cpp"`` (nn.Unfold, torchvision's conv reshaped)
    or ``"ppc"`` (einops ``(p1 p2 c)``, JAX/Keras ``space_to_depth``).
    """
    ph, pw = to_2tuple(patch_size, "patch_size")
    d = weight.shape[0]
    if weight.shape[1] != in_channels * ph * pw:
        raise InputError(f"expected a (D, {in_channels * ph * pw}) matrix, got {tuple(weight.shape)}")
    if order == "cpp":
        return weight.reshape(d, in_channels, ph, pw)
    if order == "ppc":
        return weight.reshape(d, ph, pw, in_channels).permute(0, 3, 1, 2).contiguous()
    raise ConfigError(f"order must be 'cpp' or 'ppc', got {order!r}")


def conv_to_linear_weight(weight: torch.Tensor, order: str) -> torch.Tensor:
    """Inverse of :func:`linear_to_conv_weight`: (D, C, ph, pw) -> (D, P*P*C) in ``order``."""
    d = weight.shape[0]
    if order == "cpp":
        return weight.reshape(d, -1)
    if order == "ppc":
        return weight.permute(0, 2, 3, 1).reshape(d, -1)
    raise ConfigError(f"order must be 'cpp' or 'ppc', got {order!r}")


def patchify(x: torch.Tensor, patch_size, order: str = "ppc") -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C): the raw patches, row-major over the grid (no weights)."""
    ph, pw = to_2tuple(patch_size, "patch_size")
    B, C, H, W = x.shape
    if H % ph or W % pw:
        raise InputError(f"image {H}x{W} is not divisible by patch {ph}x{pw}")
    gh, gw = H // ph, W // pw
    x = x.reshape(B, C, gh, ph, gw, pw)
    if order == "ppc":
        x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, ph, pw, C)
    elif order == "cpp":
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, ph, pw)
    else:
        raise ConfigError(f"order must be 'cpp' or 'ppc', got {order!r}")
    return x.reshape(B, gh * gw, C * ph * pw)


def patch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The strided convolution with kernel ``weight`` (D, C, ph, pw) as one GEMM: (B, C, H, W) ->
    (B, N, D), equal to ``conv2d(x, weight, bias, stride=(ph, pw))`` flattened (float rounding)."""
    return F.linear(patchify(x, weight.shape[-2:], order="cpp"), weight.flatten(1), bias)


class PatchEmbed(nn.Module):
    """Image to patch tokens with one weight, three equivalent computations.

    Args:
        image_size: (H, W) the model expects.
        patch_size: (ph, pw).
        in_channels: C.
        dim: token width D.
        mode: ``"conv"`` (strided Conv2d), ``"unfold"`` (nn.Unfold + matmul) or
            ``"rearrange"`` (reshape/permute as einops + matmul).
        bias: whether the projection has a bias (most published ViTs do; CLIP does not).
        dynamic_size: accept any H x W divisible by the patch (the model resamples its position
            table per grid); False = only ``image_size``.
        norm: a norm applied to the tokens after the projection (AIMv2's RMSNorm; timm's
            ``embed_norm_layer``, named ``norm`` here as there); None = none.

    Input (B, C, H, W) -> output (B, N, D).
    """

    def __init__(self, image_size, patch_size, in_channels: int, dim: int, mode: str = "conv",
                 bias: bool = True, dynamic_size: bool = False, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.dynamic_size = dynamic_size
        self.image_size = to_2tuple(image_size, "image_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.in_channels = in_channels
        self.dim = dim
        self.mode = mode
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        """(gh, gw) of the patch grid of an image batch (B, C, H, W)."""
        return x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor image batch (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise InputError(
                f"expected a 4-D image batch (B, C, H, W) = (B, {self.in_channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}), got shape {tuple(x.shape)}"
                + ("; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else "")
            )
        if x.shape[1] != self.in_channels:
            raise InputError(f"expected {self.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if self.dynamic_size:
            H, W = x.shape[2:]
            ph, pw = self.patch_size
            if H % ph or W % pw or H < ph or W < pw:
                raise InputError(f"expected an image size divisible by the patch size {ph}x{pw} (dynamic_img_size), "
                                 f"got {H}x{W}; resize or pad to a multiple of the patch")
        elif tuple(x.shape[2:]) != self.image_size:
            H, W = x.shape[2:]
            ph, pw = self.patch_size
            extra = ""
            if H % ph or W % pw:
                extra = f"; {H}x{W} is not even divisible by the patch size {ph}x{pw}"
            raise InputError(
                f"expected images of size {self.image_size[0]}x{self.image_size[1]}, got {H}x{W}{extra}; "
                "resize the input or call model.set_image_size(...)"
            )
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image tensor, got dtype {x.dtype}; convert with x.float()")
        w = self.proj.weight
        if x.device != w.device:
            raise InputError(f"the input is on {x.device} but the model is on {w.device}; use x.to({str(w.device)!r})")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            # e.g. float64 from numpy into a float32 model: torch's own message names the bias only
            raise InputError(f"expected a {w.dtype} image tensor (the model's dtype), got {x.dtype}; "
                             f"convert with x.to({w.dtype}) or run under torch.autocast")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)  # (B, N, D)
        return self.norm(x) if self.norm is not None else x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The patch projection alone, by ``mode``: (B, C, H, W) -> (B, N, D)."""
        w, b = self.proj.weight, self.proj.bias
        if self.mode == "conv":
            if x.device.type == "cpu":
                x = self.proj(x)  # (B, D, gh, gw)
                return x.flatten(2).transpose(1, 2)  # (B, N, D)
            # Off the CPU the same product runs as one GEMM over the (c, ph, pw)-flattened patches:
            # cuDNN's kernels for stride == kernel ran at ~40 TFLOP/s on an H200 (1.5 ms of a 22 ms
            # ViT-B/16 bf16 batch of 256), the GEMM near the card's matmul rate. On the CPU the
            # convolution is the faster one (oneDNN; measured 5-15% ahead at ViT-S/B sizes).
            return patch_linear(x, w, b)  # (B, N, D)
        if self.mode == "unfold":
            patches = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # (B, C*ph*pw, N)
            out = patches.transpose(1, 2) @ conv_to_linear_weight(w, "cpp").t()
        else:  # rearrange: b c (h p1) (w p2) -> b (h w) (p1 p2 c)
            out = patchify(x, self.patch_size, order="ppc") @ conv_to_linear_weight(w, "ppc").t()
        return out + b if b is not None else out

    def set_image_size(self, image_size) -> None:
        size = to_2tuple(image_size, "image_size")
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ConfigError(f"image size {size} is not divisible by patch size {self.patch_size}")
        self.image_size = size

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, patch_size={self.patch_size}, grid={self.grid_size}, mode={self.mode}"
                + (", dynamic_size=True" if self.dynamic_size else ""))

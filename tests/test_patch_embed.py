"""Patch embedding: strided Conv2d == nn.Unfold + Linear == einops rearrange + Linear, from the
same weights (flatten orders (c, ph, pw) vs (ph, pw, c) handled by the weight converters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit import ViT, ViTConfig
from vitkit.errors import ConfigError, InputError
from vitkit.model import PatchEmbed, conv_to_linear_weight, linear_to_conv_weight, patchify
from vitkit.model.patch_embed import patch_linear

einops = pytest.importorskip("einops")


class UnfoldEmbed(nn.Module):
    """The tutorial's tokenizer: nn.Unfold (patch flattened (c, ph, pw)) then nn.Linear."""

    def __init__(self, c, p, d):
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=p, stride=p)
        self.linear = nn.Linear(c * p[0] * p[1], d)

    def forward(self, x):
        return self.linear(self.unfold(x).transpose(1, 2))


class RearrangeEmbed(nn.Module):
    """einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' then nn.Linear."""

    def __init__(self, c, p, d):
        super().__init__()
        self.p = p
        self.linear = nn.Linear(c * p[0] * p[1], d)

    def forward(self, x):
        x = einops.rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.p[0], p2=self.p[1])
        return self.linear(x)


CASES = [((32, 32), (16, 16), 3, 384), ((60, 100), (20, 20), 1, 768), ((24, 40), (4, 8), 5, 16), ((8, 8), (2, 2), 2, 6)]


@pytest.mark.parametrize("size,patch,c,d", CASES)
def test_three_formulations_same_tokens(size, patch, c, d):
    conv = PatchEmbed(size, patch, c, d, mode="conv")
    x = torch.randn(2, c, *size)
    unf = UnfoldEmbed(c, patch, d)
    rea = RearrangeEmbed(c, patch, d)
    with torch.no_grad():
        unf.linear.weight.copy_(conv_to_linear_weight(conv.proj.weight, "cpp"))
        rea.linear.weight.copy_(conv_to_linear_weight(conv.proj.weight, "ppc"))
        unf.linear.bias.copy_(conv.proj.bias)
        rea.linear.bias.copy_(conv.proj.bias)
        ref = conv(x)
        n = (size[0] // patch[0]) * (size[1] // patch[1])
        assert ref.shape == (2, n, d)
        assert torch.allclose(unf(x), ref, atol=1e-5)
        assert torch.allclose(rea(x), ref, atol=1e-5)
        # the GEMM the conv mode runs off the CPU, and F.conv2d itself
        assert torch.allclose(patch_linear(x, conv.proj.weight, conv.proj.bias), ref, atol=1e-5)
        assert torch.allclose(patch_linear(x, conv.proj.weight, None) + conv.proj.bias, ref, atol=1e-5)
        want = F.conv2d(x, conv.proj.weight, conv.proj.bias, stride=patch).flatten(2).transpose(1, 2)
        assert torch.allclose(ref, want, atol=1e-6)
        # our modes over the same parameter
        for mode in ("unfold", "rearrange"):
            other = PatchEmbed(size, patch, c, d, mode=mode)
            other.load_state_dict(conv.state_dict())
            assert torch.allclose(other(x), ref, atol=1e-5)
        # the flatten order matters (unless the patch is one value per channel): the wrong converter differs
        if c > 1:
            rea.linear.weight.copy_(conv_to_linear_weight(conv.proj.weight, "cpp"))
            assert not torch.allclose(rea(x), ref, atol=1e-3)


@pytest.mark.parametrize("order", ["cpp", "ppc"])
def test_weight_converters_round_trip(order):
    w = torch.randn(7, 3, 4, 5)
    lin = conv_to_linear_weight(w, order)
    assert lin.shape == (7, 60)
    assert torch.equal(linear_to_conv_weight(lin, 3, (4, 5), order), w)
    # linear -> conv from a Linear trained on einops patches gives the conv that computes the same
    x = torch.randn(1, 3, 8, 10)
    W = torch.randn(7, 60)
    out_lin = patchify(x, (4, 5), order=order) @ W.t()
    out_conv = F.conv2d(x, linear_to_conv_weight(W, 3, (4, 5), order), stride=(4, 5)).flatten(2).transpose(1, 2)
    assert torch.allclose(out_lin, out_conv, atol=1e-5)


def test_patchify_matches_einops_and_unfold():
    x = torch.randn(2, 3, 12, 8)
    ppc = einops.rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=2)
    assert torch.equal(patchify(x, (4, 2), "ppc"), ppc)
    assert torch.equal(patchify(x, (4, 2), "cpp"), F.unfold(x, (4, 2), stride=(4, 2)).transpose(1, 2))


def test_tutorial2_shapes_60x100_one_channel():
    x = torch.randn(1, 1, 60, 100)
    p = patchify(x, 20)
    assert p.shape == (1, 15, 400)
    # patch 7 = grid row 1, column 2: rows 20..39, columns 40..59
    assert torch.equal(p[0, 7], x[0, 0, 20:40, 40:60].reshape(-1))
    pe = PatchEmbed((60, 100), 20, 1, 768, mode="unfold")
    with torch.no_grad():
        t = pe(x)
        hand = pe.proj.weight.reshape(768, 400) @ x[0, 0, 20:40, 40:60].reshape(-1) + pe.proj.bias
    assert t.shape == (1, 15, 768)
    assert torch.allclose(t[0, 7], hand, atol=1e-5)


def test_tutorial1_hand_computed_patch():
    """32x32, 2 patches per row -> 4 tokens of 16x16, dim 384; patch 3 (bottom-right) by hand."""
    pe = PatchEmbed(32, 16, 3, 384)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        t = pe(x)
        hand = torch.stack([(pe.proj.weight[k] * x[0, :, 16:, 16:]).sum() for k in range(384)]) + pe.proj.bias
    assert t.shape == (1, 4, 384) and pe.grid_size == (2, 2)
    assert torch.allclose(t[0, 3], hand, atol=1e-5)


@pytest.mark.parametrize("mode", ["conv", "unfold", "rearrange"])
def test_model_modes_give_same_logits(tiny_config, mode):
    ref = ViT(tiny_config(image_size=(16, 24), patch_size=(4, 8))).eval()
    m = ViT(ref.config.replace(patch_embed=mode)).eval()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), atol=1e-5)


def test_converter_errors():
    with pytest.raises(InputError, match="60"):
        linear_to_conv_weight(torch.randn(7, 59), 3, (4, 5), "ppc")
    with pytest.raises(ConfigError, match="order"):
        conv_to_linear_weight(torch.randn(7, 3, 4, 5), "pcp")
    with pytest.raises(InputError, match="not divisible"):
        patchify(torch.randn(1, 3, 10, 10), 4)


def test_config_patch_embed_sizes():
    c = ViTConfig(image_size=(60, 100), patch_size=20, in_channels=1, dim=768, num_heads=12)
    assert (c.grid_size, c.num_patches, c.patch_dim) == ((3, 5), 15, 400)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the conv mode runs as a GEMM there)")
def test_cuda_patch_embedding_equals_cpu():
    """Off the CPU the conv mode runs ``patch_linear``: same tokens as the CPU's convolution, and the
    same gradients (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pe = PatchEmbed((32, 48), (16, 16), 3, 64)
    x = torch.randn(3, 3, 32, 48, requires_grad=True)
    ref = pe(x)
    ref.square().sum().backward()
    g_ref, gx_ref = pe.proj.weight.grad.clone(), x.grad.clone()
    pe.zero_grad()
    pe.cuda()
    xc = x.detach().cuda().requires_grad_()
    out = pe(xc)
    out.square().sum().backward()
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pe.proj.weight.grad.cpu(), g_ref, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(xc.grad.cpu(), gx_ref, atol=1e-4, rtol=1e-4)

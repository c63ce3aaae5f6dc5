"""The fused oneDNN CPU inference path equals the reference path (float rounding only)."""

import pytest
import torch

import vitkit
from vitkit.model import fused

pytestmark = pytest.mark.skipif(not fused.fused_cpu_available(), reason="oneDNN linear post-ops unavailable")


@pytest.mark.parametrize("kw", [
    {},
    {"act": "gelu_tanh"},
    {"act": "relu", "qkv_bias": False},
    {"pooling": "mean", "class_token": False, "fc_norm": True},
    {"num_registers": 2, "pos_embed": "sincos2d"},
])
def test_fused_matches_reference(kw):
    torch.manual_seed(0)
    m = vitkit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=8, depth=2, num_classes=7, **kw).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)  # no_grad (not inference_mode): reference aten path
    with torch.inference_mode():
        out = m(x)
    assert fused.use_fused(x.clone()) is False  # outside inference mode: never fused
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_fused_path_is_taken_and_can_be_disabled(monkeypatch):
    calls = []
    real = fused.linear_add

    def spy(x, linear, residual):
        calls.append(fused.use_fused(x))
        return real(x, linear, residual)

    monkeypatch.setattr("vitkit.model.attention.linear_add", spy)
    m = vitkit.create_model("vit_tiny_patch16_224", image_size=16, depth=1).eval()
    with torch.inference_mode():
        m(torch.randn(1, 3, 16, 16))
    assert calls == [True]
    fused.set_fused_cpu(False)
    try:
        calls.clear()
        with torch.inference_mode():
            m(torch.randn(1, 3, 16, 16))
        assert calls == [False]
    finally:
        fused.set_fused_cpu(True)


def test_fused_add_and_gelu_ops_match_hand_computation():
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 8)
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    with torch.inference_mode():
        got_add = fused.linear_add(x, lin, r)
        got_act = fused.linear_act(x, lin, "gelu", torch.nn.GELU())
    want = r + x @ lin.weight.detach().t() + lin.bias.detach()
    torch.testing.assert_close(got_add, want, atol=1e-5, rtol=1e-5)
    z = x @ lin.weight.detach().t() + lin.bias.detach()
    torch.testing.assert_close(got_act, 0.5 * z * (1 + torch.erf(z / 2**0.5)), atol=1e-5, rtol=1e-5)

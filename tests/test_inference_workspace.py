"""The buffer-reusing inference path (``ViT.inference_workspace``): bit-identical to the plain
path in every layout, actually taken where it should be, skipped where it must not be, and
allocating less. Speed is measured in BENCHMARKS.md, not here."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vitkit import ViT, ViTConfig
from vitkit.model import Block

LAYOUTS = {
    "default": {},
    "post_norm": dict(norm_first=False),
    "layer_scale": dict(layer_scale=0.1),
    "no_qkv_bias": dict(qkv_bias=False),
    "relu": dict(act="relu"),
    "gelu_tanh": dict(act="gelu_tanh"),
    "quick_gelu": dict(act="quick_gelu"),
    "silu": dict(act="silu"),
    "mean_registers_no_cls": dict(pooling="mean", class_token=False, num_registers=2),
    "non_square_1ch": dict(image_size=(16, 24), patch_size=(4, 8), in_channels=1),
    "sincos2d_features": dict(pos_embed="sincos2d", num_classes=0),
}


def _model(**kw) -> ViT:
    cfg = dict(image_size=16, patch_size=4, dim=32, depth=3, num_heads=4, num_classes=5)
    torch.manual_seed(0)
    m = ViT(ViTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # move norms/biases off ones/zeros so every term matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture
def count_fast(monkeypatch):
    """Counts calls of Block.forward_into (the workspace path)."""
    calls = []
    orig = Block.forward_into

    def spy(self, x, ws):
        calls.append(1)
        return orig(self, x, ws)

    monkeypatch.setattr(Block, "forward_into", spy)
    return calls


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_workspace_path_is_bit_identical(layout, count_fast):
    m = _model(**LAYOUTS[layout])
    x = torch.randn(3, m.config.in_channels, *m.config.image_hw)
    ref, ref_logits = m.forward_features(x), m(x)  # autograd on -> the plain path
    assert not count_fast
    with torch.inference_mode():
        fast = m.forward_features(x)
        assert len(count_fast) == m.config.depth  # the workspace path ran, once per block
        fast_logits = m(x)  # (with a class token, the last block runs for it alone, in both)
    with torch.no_grad():
        fast2 = m.forward_features(x)
        m.inference_workspace = False
        plain2 = m.forward_features(x)
    assert torch.equal(fast, ref.detach())
    assert torch.equal(fast_logits, ref_logits.detach())
    assert torch.equal(fast2, plain2)
    # the check can fail: a changed weight changes the workspace path's output
    with torch.no_grad():
        m.blocks[-1].mlp.fc2.bias[0] += 1.0
        m.inference_workspace = True
        assert not torch.equal(m.forward_features(x), fast)


def test_outputs_do_not_share_buffers():
    """Post-norm has no final norm: the returned tokens are the residual stream itself. Each call
    owns its buffers, so a later call must not overwrite an earlier result."""
    m = _model(norm_first=False)
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t1 = m.forward_features(x1)
        keep = t1.clone()
        t2 = m.forward_features(x2)
    assert torch.equal(t1, keep)
    assert not torch.equal(t1, t2)


@pytest.mark.parametrize("case", ["grad", "train_mode", "autocast", "hook", "attention"])
def test_plain_path_where_required(case, count_fast):
    m = _model()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    if case == "grad":
        m(x)
    elif case == "train_mode":
        with torch.no_grad():
            m.train()(x)
    elif case == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert m(x).dtype == torch.bfloat16
    elif case == "hook":
        m.blocks[1].mlp.fc1.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        with torch.no_grad():
            m(x)
        assert seen == [torch.Size([2, 16 + 1, 128])]  # the hook fired
    else:
        with torch.no_grad():
            _, maps = m(x, return_attention=True)
        assert len(maps) == m.config.depth
    assert not count_fast


def _allocated_bytes(model: ViT, x: torch.Tensor) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_workspace_path_allocates_less():
    """The point of the path: each block's matmul outputs reuse a few buffers, so a forward
    allocates far less memory than one that makes fresh tensors in every layer."""
    m = _model(depth=6, dim=64, num_heads=4)
    x = torch.randn(8, 3, 16, 16)
    fast = _allocated_bytes(m, x)
    m.inference_workspace = False
    plain = _allocated_bytes(m, x)
    assert fast < 0.5 * plain, (fast, plain)


# --------------------------------------------------------------------------- class-token-only last block
CLS_LAYOUTS = {k: v for k, v in LAYOUTS.items() if "mean" not in k and "features" not in k}


@pytest.fixture
def count_first_token(monkeypatch):
    calls = []
    orig = Block.forward_first_token

    def spy(self, x):
        calls.append(tuple(x.shape))
        return orig(self, x)

    monkeypatch.setattr(Block, "forward_first_token", spy)
    return calls


@pytest.mark.parametrize("layout", sorted(CLS_LAYOUTS))
def test_last_block_for_the_class_token_only(layout, count_first_token):
    """forward() lets the last block compute the class token alone; logits and gradients equal
    those of the full computation (forward_head(forward_features(x))) to float rounding."""
    m = _model(**CLS_LAYOUTS[layout]).train()  # dropout is 0: train mode is deterministic here
    x = torch.randn(3, m.config.in_channels, *m.config.image_hw)
    y = torch.tensor([0, 3, 4])
    full = m.forward_head(m.forward_features(x))
    torch.nn.functional.cross_entropy(full, y).backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    assert not count_first_token
    short = m(x)
    assert count_first_token == [(3, m.config.num_tokens, m.config.dim)]
    torch.testing.assert_close(short, full, atol=2e-6, rtol=1e-5)
    torch.nn.functional.cross_entropy(short, y).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_full[n], atol=2e-6, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
    # the last block's MLP acts on one token per image: its weights still get a gradient
    assert m.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the inference path (workspace for the first blocks) agrees too
        torch.testing.assert_close(m.eval()(x), full.detach(), atol=2e-6, rtol=1e-5)


def test_full_last_block_where_every_token_is_read_or_watched(count_first_token):
    for kw in (dict(pooling="mean"), dict(pooling="mean", class_token=False)):
        m = _model(**kw)
        m(torch.randn(2, 3, 16, 16))
    m = _model()
    seen = []
    m.blocks[-1].register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    m(torch.randn(2, 3, 16, 16))
    assert seen == [(2, 17, 32)]  # a hook on the last block sees every token
    assert not count_first_token

"""One forward per module: the query subset (class-token-only last block) equals the full
computation sliced, in values and gradients, in every layout; activation checkpointing gives the
same gradients; torch.compile and bf16 autocast run the same graph on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit import ViT, ViTConfig
from vitkit.model import Attention, Block

LAYOUTS = {
    "default": {},
    "post_norm": dict(norm_first=False),
    "layer_scale": dict(layer_scale=0.1),
    "no_qkv_bias": dict(qkv_bias=False),
    "quick_gelu": dict(act="quick_gelu"),
    "registers": dict(num_registers=2),
    "dist_token": dict(dist_token=True),
    "swiglu_rmsnorm_norm_pre": dict(mlp_layer="swiglu", norm_layer="rmsnorm", norm_pre=True),
    "non_square_1ch": dict(image_size=(16, 24), patch_size=(4, 8), in_channels=1),
}


def _model(**kw) -> ViT:
    cfg = dict(image_size=16, patch_size=4, dim=32, depth=3, num_heads=4, num_classes=5)
    torch.manual_seed(0)
    m = ViT(ViTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # move norms/biases off ones/zeros so every term matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("k", [1, 3])
def test_attention_query_subset_equals_full_rows(k):
    a = Attention(48, 6)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 9, 48)
    full, w_full = a(x, return_attention=True)
    sub = a(x, num_queries=k)
    sub_e, w = a(x, num_queries=k, return_attention=True)  # explicit path, same rows
    assert sub.shape == (2, k, 48) and w.shape == (2, 6, k, 9)
    torch.testing.assert_close(sub, full[:, :k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sub_e, full[:, :k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, w_full[:, :, :k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_query_subset_equals_full_rows(norm_first):
    blk = Block(32, 4, 64, norm_first=norm_first, layer_scale=0.5)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(blk(x, num_queries=2), blk(x)[:, :2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_last_block_for_the_head_tokens_only(layout):
    """forward() lets the last block compute the tokens the head reads (class [+ distillation]
    token) alone; logits and gradients equal the full computation's to float rounding, and a
    hook on the last block sees those tokens only (documented in ViT.forward)."""
    m = _model(**LAYOUTS[layout]).train()  # dropout is 0: train mode is deterministic here
    x = torch.randn(3, m.config.in_channels, *m.config.image_hw)
    y = torch.tensor([0, 3, 4])
    full = m.forward_head(m.forward_features(x))
    F.cross_entropy(full, y).backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    seen = []
    m.blocks[-1].register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    short = m(x)
    k = 2 if m.config.dist_token else 1
    assert seen == [(3, k, 32)]
    torch.testing.assert_close(short, full, atol=2e-6, rtol=1e-5)
    F.cross_entropy(short, y).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_full[n], atol=2e-6, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
    assert m.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0
    m.last_block_prefix_only = False  # the switch: every token everywhere
    seen.clear()
    m(x)
    assert seen == [(3, m.config.num_tokens, 32)]


@pytest.mark.parametrize("pooling", ["mean", "map"])
def test_full_last_block_where_every_token_is_read(pooling):
    m = _model(pooling=pooling)
    seen = []
    m.blocks[-1].register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    m(torch.randn(2, 3, 16, 16))
    assert seen == [(2, 17, 32)]


# --------------------------------------------------------------------------- activation checkpointing
def _grads(m: ViT, x, y, seed=0):
    m.zero_grad()
    torch.manual_seed(seed)
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [{}, dict(drop_path=0.5, dropout=0.1, attn_dropout=0.1)],
                         ids=["deterministic", "drop_path_dropout"])
def test_grad_checkpointing_same_gradients(kw):
    m = _model(depth=4, **kw).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss_a, g_a = _grads(m, x, y)
    m.set_grad_checkpointing(True)
    calls = []
    torch_ckpt = torch.utils.checkpoint.checkpoint
    import vitkit.model.block as vit_mod  # the one block loop lives beside Block

    def spy(*a, **k):
        calls.append(k.get("use_reentrant"))
        return torch_ckpt(*a, **k)

    vit_mod.checkpoint, orig = spy, vit_mod.checkpoint
    try:
        loss_b, g_b = _grads(m, x, y)  # same seed: same dropout / drop_path masks (RNG state replayed)
    finally:
        vit_mod.checkpoint = orig
    assert calls == [False] * 4  # every block, non-reentrant
    assert torch.equal(loss_a, loss_b)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-7, rtol=1e-6, msg=lambda s, n=n: f"{n}: {s}")
    if kw:  # the masks matter: another seed gives another loss
        assert not torch.equal(_grads(m, x, y, seed=1)[0], loss_a)
    with torch.no_grad():  # no checkpointing without gradients
        m.eval()(x)


# --------------------------------------------------------------------------- compile / autocast
def test_bf16_autocast_forward_backward_cpu():
    m = _model(mlp_layer="swiglu", pooling="map", dynamic_img_size=True).train()
    x = torch.randn(2, 3, 16, 24)
    with torch.autocast("cpu", torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        ref = m.eval()(x)
        with torch.autocast("cpu", torch.bfloat16):
            low = m(x)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.slow
def test_torch_compile_equals_eager_cpu():
    pytest.importorskip("torch._inductor")
    m = _model(depth=2)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)
    m.train()
    y = torch.tensor([0, 1])
    F.cross_entropy(compiled(x), y).backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(g[n], p.grad, atol=1e-5, rtol=1e-4)

"""vitkit.infer.Predictor: the fp32 engine equals model(x) (oracle: the model's own forward) over
every layout (bit-identical with exact=True, within 1e-5 with the default oneDNN matmuls); unknown parts, hooks and train mode take the model's forward; bf16 and int8 agree
with fp32 on real images (digits through a model trained here; scikit-learn's sample photos)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vitkit import ViT, ViTConfig
from vitkit.errors import ConfigError, InputError
from vitkit.infer import Predictor, agreement, bf16_native
from vitkit.infer import engine as engine_mod

BASE = dict(image_size=32, patch_size=8, dim=64, depth=3, num_heads=4, mlp_dim=128, num_classes=10)
LAYOUTS = {
    "cls": {},
    "post_norm": dict(norm_first=False),
    "mean_fc_norm": dict(pooling="mean", fc_norm=True),
    "mean": dict(pooling="mean"),
    "registers": dict(num_registers=4),
    "layer_scale": dict(layer_scale=0.1),
    "no_class_token": dict(class_token=False, pooling="mean"),
    "no_qkv_bias": dict(qkv_bias=False),
    "non_square": dict(image_size=(32, 48)),
    "one_channel": dict(in_channels=1),
    "features": dict(num_classes=0),
    "quick_gelu": dict(act="quick_gelu"),
    "sincos2d": dict(pos_embed="sincos2d"),
    "pre_logits": dict(head_hidden_dim=32),
    "post_norm_registers_ls": dict(norm_first=False, num_registers=2, layer_scale=0.5),
    "norm_pre_no_patch_bias": dict(norm_pre=True, patch_bias=False, head_bias=False),
    "dist_token": dict(dist_token=True),
    "map_pooling": dict(pooling="map"),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "swiglu": dict(mlp_layer="swiglu"),
    "rmsnorm_swiglu_ls_registers": dict(norm_layer="rmsnorm", mlp_layer="swiglu", layer_scale=0.3, num_registers=2),
    "rmsnorm_post_norm": dict(norm_layer="rmsnorm", norm_first=False),
}


def perturbed(**overrides) -> ViT:
    """A tiny eval-mode model with every parameter off its init (zero biases, unit norms and
    LayerScale's small gamma would hide mistakes)."""
    m = ViT(ViTConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def batch(m: ViT, B: int = 3) -> torch.Tensor:
    c = m.config
    return torch.randn(B, c.in_channels, *c.image_hw)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_engine_equals_model(layout):
    m = perturbed(**LAYOUTS[layout])
    x = batch(m)
    with torch.no_grad():
        want = m(x)
    p = Predictor(m, exact=True)
    assert p.path == "engine", p.notes
    got = p(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # same kernels on the same views as the model's forward: the same bits
    assert torch.equal(got, want), (got - want).abs().max()


needs_packed = pytest.mark.skipif(not engine_mod.packed_available(), reason="no oneDNN on x86-64 here")


@needs_packed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_default_onednn_walk_is_within_1e5(layout):
    """The default fp32 walk (oneDNN matmuls on reordered weights, fused GELU / residual add)
    differs from model(x) by float rounding only: within 1e-5 of the largest output, and not the
    exact walk under another name (where a fused kernel ran, some bits differ)."""
    m = perturbed(**LAYOUTS[layout])
    x = batch(m, 5)
    with torch.no_grad():
        want = m(x)
    p = Predictor(m)
    assert p.path == "engine", p.notes
    assert all(isinstance(b.fc2, engine_mod.Packed) for b in p._plan.blocks)
    got = p(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), err
    assert torch.equal(got.argmax(-1), want.argmax(-1)) or want.shape[-1] == 0


@needs_packed
def test_fp32_default_walk_sees_weight_updates_and_repacks_once():
    m = perturbed()
    p = Predictor(m)
    x = batch(m)
    fc1 = p._plan.blocks[1].fc1
    p(x)
    packed = fc1._w
    p(x)
    assert fc1._w is packed  # unchanged weights: the reordered copy is reused
    with torch.no_grad():
        m.blocks[1].mlp.fc1.weight.mul_(2.0)
        torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-5)
    assert fc1._w is not packed
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})  # new storage
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-5)


def test_dynamic_image_size_other_input_size():
    m = perturbed(dynamic_img_size=True)
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(Predictor(m)(x), m(x), rtol=0, atol=1e-5)


def test_class_token_last_block_follows_the_model_switch():
    m = perturbed()
    m.last_block_prefix_only = False
    x = batch(m)
    with torch.no_grad():
        assert torch.equal(Predictor(m, exact=True)(x), m(x))  # every block in full: bit-identical


def test_fp32_full_blocks_are_bit_exact():
    """Mean pooling runs every block in full through the engine: same kernels, same bits."""
    m = perturbed(pooling="mean", fc_norm=True, layer_scale=0.3)
    x = batch(m, 4)
    with torch.no_grad():
        assert torch.equal(Predictor(m, exact=True)(x), m(x))


def test_engine_sees_weight_updates_fp32():
    m = perturbed()
    p = Predictor(m)
    x = batch(m)
    with torch.no_grad():
        m.blocks[1].mlp.fc1.weight.mul_(2.0)
        torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-5)


def test_unknown_part_falls_back_to_model_forward(caplog):
    class DoubledNorm(nn.Module):  # a norm the engine does not know
        def forward(self, x):
            return 2 * nn.functional.layer_norm(x, x.shape[-1:])

    m = perturbed()
    m.blocks[1].norm2 = DoubledNorm()
    with caplog.at_level(logging.WARNING, logger="vitkit.infer"):
        p = Predictor(m)
    assert p.path == "model" and "block 1 norm2 is DoubledNorm" in p.notes[0]
    assert "engine off" in caplog.text
    x = batch(m)
    with torch.no_grad():
        assert torch.equal(p(x), m(x))


def test_hooks_fire_and_see_the_model_path():
    m = perturbed()
    seen = []
    h = m.blocks[2].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    p = Predictor(m)
    assert p.path == "model"
    x = batch(m)
    with torch.no_grad():
        assert torch.equal(p(x), m(x))
    assert len(seen) == 2  # fired for the Predictor's call and for the model's
    h.remove()
    # a hook added after construction of an fp32 Predictor is noticed too
    p2 = Predictor(m)
    assert p2.path == "engine"
    m.norm.register_forward_hook(lambda mod, i, o: o * 0)
    torch.testing.assert_close(p2(x), m.head.bias.detach().expand(3, -1))  # the hook zeroed the tokens


def test_verify_catches_a_misread_layout(monkeypatch):
    """The construction-time check is a real guard: an engine that skips a block is caught."""
    real = engine_mod.block
    calls = []

    def skips_first(p, x, ws, k=None):
        calls.append(1)
        return x if len(calls) == 1 else real(p, x, ws, k)

    monkeypatch.setattr(engine_mod, "block", skips_first)
    m = perturbed()
    p = Predictor(m)
    assert p.path == "model" and "differs from model(x)" in p.notes[0]
    x = batch(m)
    with torch.no_grad():
        assert torch.equal(p(x), m(x))


def test_train_mode_runs_the_model_forward():
    m = perturbed(dropout=0.5).train()
    p = Predictor(m)
    x = batch(m)
    torch.manual_seed(1)
    a = p(x)
    torch.manual_seed(1)
    with torch.no_grad():
        b = m(x)
    assert torch.equal(a, b)


def test_bad_arguments():
    m = perturbed()
    with pytest.raises(ConfigError, match="dtype"):
        Predictor(m, dtype="fp16")
    with pytest.raises(ConfigError, match="compile"):
        Predictor(m, compile="yes")
    with pytest.raises(ConfigError, match="exact=True is the bit-identical fp32 walk; dtype 'bf16'"):
        Predictor(m, "bf16", exact=True)
    with pytest.raises(InputError, match=r"\(B, C, H, W\)"):
        Predictor(m)(torch.randn(3, 32, 32))
    with pytest.raises(InputError, match="float"):
        Predictor(m)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bf16_without_native_support_runs_fp32_with_a_note(monkeypatch, caplog):
    import vitkit.infer.predictor as pred

    monkeypatch.setattr(pred, "bf16_native", lambda: False)
    m = perturbed()
    with caplog.at_level(logging.WARNING, logger="vitkit.infer"):
        p = Predictor(m, "bf16")
    assert p.dtype == "fp32" and "native bf16" in caplog.text
    x = batch(m)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_low_precision_paths_are_close_and_use_the_engine(dtype, layout):
    """Every layout runs bf16 / int8 through the engine, within a few % of fp32 (relative to the
    largest output; measured 0.5-2% bf16, 0.6-5% int8 on these random models)."""
    if dtype == "bf16" and not bf16_native():
        pytest.skip("no native bf16 on this CPU")
    m = perturbed(**LAYOUTS[layout])
    p = Predictor(m, dtype)
    assert p.path == "engine" and p.dtype == dtype
    if dtype == "bf16" and engine_mod.packed_available():  # bf16 weights reordered once for oneDNN
        assert all(isinstance(b.fc2, engine_mod.Packed) for b in p._plan.blocks)
    x = batch(m, 4)
    with torch.no_grad():
        want = m(x)
    got = p(x)
    assert got.dtype == torch.float32
    err = (got - want).abs().max() / want.abs().max()
    assert err < 0.1, err
    assert err > 0  # really a different precision, not the fp32 path under another name


def test_int8_of_unknown_layout_says_it_runs_fp32():
    m = perturbed()
    m.blocks[0].mlp.act = nn.Softplus()  # an activation the engine does not apply
    p = Predictor(m, "int8")
    assert p.dtype == "fp32" and p.path == "model" and "int8" in p.notes[0]


# --------------------------------------------------------------------------- real images
def _digits_model_and_test_set():
    """A tiny ViT trained here on scikit-learn's 8x8 digits (patch 2: 16 tokens; 15 epochs, a few
    seconds on an idle core) and its ~400 held-out images; it reaches ~90% test accuracy."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 - 0.5) / 0.5
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    m = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64, depth=2, num_heads=4,
                      mlp_dim=128))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.01)
    m.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds spin-waits on a shared machine
    try:
        for _epoch in range(15):
            for idx in tr[torch.randperm(len(tr), generator=g)].split(128):
                opt.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    m.eval()
    return m, x[te], y[te]


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    return _digits_model_and_test_set()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_top1_agreement_on_digits(digits, dtype):
    if dtype == "bf16" and not bf16_native():
        pytest.skip("no native bf16 on this CPU")
    m, x, y = digits
    with torch.no_grad():
        acc = (m(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.85, f"the test model did not learn digits ({acc:.3f}); agreement would mean little"
    a = agreement(m, x.split(64), dtype)
    assert a.dtype == dtype and a.n == len(y)
    assert a.top1 >= 0.97, str(a)
    assert a.max_abs_diff > 0


@pytest.mark.slow
def test_agreement_on_sample_photos_through_a_random_vit():
    """scikit-learn's two sample photos, cut into 32 crops each, through a random small ViT:
    fp32 and int8 (and bf16 where native) pick the same class for almost every crop."""
    from sklearn.datasets import load_sample_images

    imgs = [torch.tensor(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(0)
    crops = []
    for im in imgs:
        _, H, W = im.shape
        for _ in range(32):
            i = int(torch.randint(0, H - 64, (1,), generator=g))
            j = int(torch.randint(0, W - 64, (1,), generator=g))
            crops.append(im[:, i:i + 64, j:j + 64])
    x = (torch.stack(crops) - 0.5) / 0.5
    m = ViT(ViTConfig(image_size=64, patch_size=16, dim=96, depth=3, num_heads=4, mlp_dim=192,
                      num_classes=100)).eval()
    with torch.no_grad():
        m.head.weight.mul_(50)  # spread the logits: a random init's are near-ties everywhere
    for dtype in ("int8", "bf16") if bf16_native() else ("int8",):
        a = agreement(m, x.split(32), dtype)
        assert a.n == 64 and a.top1 >= 0.9, str(a)

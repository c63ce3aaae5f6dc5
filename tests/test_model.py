"""The ViT model: presets and parameter counts, numerical equivalence with timm, blocks, init,
staged forwards, input errors, and the tutorials' scenarios."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit import ViT, ViTConfig
from vitkit.bench.flops import count_params
from vitkit.config import PRESETS
from vitkit.errors import InputError
from vitkit.model import Block, DropPath, Mlp, sincos_1d

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

# --------------------------------------------------------------------------- presets / parameter counts
PUBLISHED = {  # 1000 classes, 224x224 (timm / the papers)
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
}


def meta_params(model_fn) -> int:
    with torch.device("meta"):
        m = model_fn()
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    assert meta_params(lambda: vitkit.create_model(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_count_params_agrees(name):
    c = PRESETS[name]
    n = meta_params(lambda: ViT(c))
    assert count_params(c) == n
    assert c.num_classes == 1000


_TIMM_NAMES = set(timm.list_models("vit_*"))


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n in _TIMM_NAMES))
def test_preset_param_count_equals_timm(name):
    ours = meta_params(lambda: vitkit.create_model(name))
    theirs = meta_params(lambda: timm.create_model(name, pretrained=False, num_classes=1000))
    assert ours == theirs


ODD = [
    dict(num_registers=4),
    dict(layer_scale=1e-5),
    dict(head_hidden_dim=24),
    dict(class_token=False, pooling="mean"),
    dict(pooling="mean", fc_norm=True),
    dict(pos_embed="sincos2d"),
    dict(pos_embed="sincos1d", class_token=False, pooling="mean"),
    dict(pos_embed="none", qkv_bias=False),
    dict(num_registers=2, pos_embed_prefix=False),
    dict(norm_first=False),
    dict(num_classes=0),
    dict(image_size=(16, 24), patch_size=(4, 8), in_channels=1),
    dict(norm_layer="rmsnorm", norm_pre=True, patch_bias=False, head_bias=False),
    dict(mlp_layer="swiglu", pooling="map", num_registers=1),
    dict(dist_token=True, head_hidden_dim=8),
]


@pytest.mark.parametrize("kw", ODD, ids=[str(k) for k in ODD])
def test_count_params_odd_configs(tiny_config, kw):
    c = tiny_config(**kw)
    m = ViT(c)
    assert count_params(c) == m.num_params()


# --------------------------------------------------------------------------- timm numerical equivalence
BASE_T = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=7)
BASE_O = dict(image_size=32, patch_size=8, dim=48, depth=2, num_heads=4, mlp_dim=96, num_classes=7)
TIMM_CASES = {
    "default": ({}, {}),
    "mean_fc_norm": (dict(global_pool="avg"), dict(pooling="mean", fc_norm=True)),
    "no_class_token": (dict(global_pool="avg", class_token=False),
                       dict(pooling="mean", fc_norm=True, class_token=False)),
    "registers": (dict(reg_tokens=3, no_embed_class=True), dict(num_registers=3, pos_embed_prefix=False)),
    "registers_embed_class": (dict(reg_tokens=2), dict(num_registers=2)),
    "layer_scale": (dict(init_values=0.1), dict(layer_scale=0.1)),
    "no_qkv_bias": (dict(qkv_bias=False), dict(qkv_bias=False)),
    "non_square": (dict(img_size=(32, 48), patch_size=(8, 16)), dict(image_size=(32, 48), patch_size=(8, 16))),
    "in_chans_1": (dict(in_chans=1), dict(in_channels=1)),
    "mean_norm_before_pool": (dict(global_pool="avg", fc_norm=False), dict(pooling="mean", fc_norm=False)),
    "registers_no_cls": (dict(global_pool="avg", class_token=False, reg_tokens=4, no_embed_class=True),
                         dict(pooling="mean", fc_norm=True, class_token=False, num_registers=4,
                              pos_embed_prefix=False)),
    "gelu_tanh": (dict(act_layer="gelu_tanh"), dict(act="gelu_tanh")),
    "quick_gelu": (dict(act_layer="quick_gelu"), dict(act="quick_gelu")),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_logits_equal_timm(case):
    tkw, okw = TIMM_CASES[case]
    tm = VisionTransformer(**{**BASE_T, **tkw}).eval()
    with torch.no_grad():  # move every tensor off its init value (norms ones, biases zeros)
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViT(ViTConfig(**{**BASE_O, **okw})).eval()
    ours.load_state_dict(tm.state_dict(), strict=True)  # identical names and shapes by design
    x = torch.randn(3, tm.patch_embed.proj.in_channels, *tm.patch_embed.img_size)
    with torch.no_grad():
        a, b = ours(x), tm(x)
        assert (a - b).abs().max() < 1e-5
        assert (ours.forward_features(x) - tm.forward_features(x)).abs().max() < 1e-5
        # and the check can fail: a single changed weight moves the logits
        ours.blocks[0].mlp.fc1.weight[0, 0] += 1.0
        assert (ours(x) - b).abs().max() > 1e-4


@pytest.mark.parametrize("path", ["full", "forward"])
def test_training_step_gradients_equal_timm(path):
    """Training through every token runs timm's kernels in timm's order: same loss and gradients
    to the bit. ``forward`` (last block for the class token only) gives them to float rounding."""
    tm = VisionTransformer(**BASE_T).train()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViT(ViTConfig(**BASE_O)).train()
    ours.load_state_dict(tm.state_dict(), strict=True)
    x = torch.randn(3, 3, *tm.patch_embed.img_size)
    y = torch.tensor([0, 1, 6])
    ours_fn = (lambda t: ours.forward_head(ours.forward_features(t))) if path == "full" else ours
    losses = []
    for fn in (ours_fn, tm):
        loss = F.cross_entropy(fn(x), y)
        loss.backward()
        losses.append(loss)
    grads_t = dict(tm.named_parameters())
    if path == "full":
        assert torch.equal(losses[0], losses[1])
    else:
        torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for n, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        if path == "full":
            assert torch.equal(p.grad, grads_t[n].grad), n
        else:
            torch.testing.assert_close(p.grad, grads_t[n].grad, atol=2e-6, rtol=1e-4)


# --------------------------------------------------------------------------- blocks
def _randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_post_norm_block_matches_hand_written():
    blk = Block(32, 4, 64, norm_first=False, act="relu").eval()
    _randomize(blk)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        h = blk.norm1(x + blk.attn(x))
        h = blk.norm2(h + blk.mlp.fc2(torch.relu(blk.mlp.fc1(h))))
        assert torch.allclose(blk(x), h, atol=1e-6)
        pre = x + blk.attn(blk.norm1(x))  # pre-norm would be different
        pre = pre + blk.mlp(blk.norm2(pre))
        assert not torch.allclose(blk(x), pre, atol=1e-3)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_equals_torch_transformer_encoder_layer(norm_first):
    """Independent oracle: torch's own encoder layer (pre- or post-norm) with our weights copied in."""
    blk = Block(32, 4, 64, norm_first=norm_first, act="relu").eval()
    _randomize(blk)
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="relu", layer_norm_eps=1e-6,
                                     batch_first=True, norm_first=norm_first).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(blk.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(blk.attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(blk.attn.proj.state_dict())
        ref.linear1.load_state_dict(blk.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(blk.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(blk.norm1.state_dict())
        ref.norm2.load_state_dict(blk.norm2.state_dict())
        x = torch.randn(3, 10, 32)
        assert (blk(x) - ref(x)).abs().max() < 1e-5


def test_pre_norm_block_matches_hand_written():
    blk = Block(32, 4, 64, layer_scale=0.5).eval()
    _randomize(blk)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        h = x + blk.ls1.gamma * blk.attn(blk.norm1(x))
        h = h + blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
        assert torch.allclose(blk(x), h, atol=1e-6)


def test_post_norm_model_has_no_final_norm(tiny_config):
    m = ViT(tiny_config(norm_first=False)).eval()
    assert isinstance(m.norm, nn.Identity)
    _randomize(m)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = m.embed(x)
        for blk in m.blocks:
            t = blk(t)
        assert torch.allclose(m.forward_features(x), t, atol=1e-6)
        assert torch.allclose(m(x), m.head(t[:, 0]), atol=1e-6)


def test_mlp_uses_its_hidden_layer():
    mlp = Mlp(16, 40, act="gelu").eval()
    _randomize(mlp)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))), atol=1e-6)
        before = mlp(x)
        mlp.fc1.weight.zero_()
        mlp.fc1.bias.zero_()
        after = mlp(x)  # gelu(0) = 0: only fc2's bias remains
    assert not torch.allclose(before, after)
    assert torch.allclose(after, mlp.fc2.bias.expand_as(after))


def test_drop_path():
    x = torch.ones(400, 3, 4)
    dp = DropPath(0.5)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    per_sample = y.reshape(400, -1)
    # whole samples are dropped (all zeros) or kept and rescaled by 1/keep
    assert all(bool((r == 0).all() or (r == 2.0).all()) for r in per_sample)
    dropped = float((per_sample[:, 0] == 0).float().mean())
    assert 0.35 < dropped < 0.65
    m = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=5, num_heads=2, drop_path=0.4))
    rates = [b.drop_path1.p if isinstance(b.drop_path1, DropPath) else 0.0 for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # timm's linspace(0, rate, depth) for every depth, one block included (it gets 0)
    for depth in (1, 2, 3):
        ours = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=depth, num_heads=2, drop_path=0.4))
        tm = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=depth, num_heads=2, drop_path_rate=0.4)
        want = [getattr(b.drop_path1, "drop_prob", 0.0) for b in tm.blocks]
        got = [b.drop_path1.p if b.drop_path1 is not None else 0.0 for b in ours.blocks]
        assert got == pytest.approx(want), depth
    # eval: identical to the same weights without stochastic depth
    m0 = ViT(m.config.replace(drop_path=0.0))
    m0.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m0.eval()(x))
        assert not torch.allclose(m.train()(x), m0.train()(x))


# --------------------------------------------------------------------------- init, weight decay
def test_init():
    m = ViT(ViTConfig(image_size=32, patch_size=4, dim=64, depth=2, num_heads=4, num_classes=100,
                      layer_scale=1e-4))
    for name, mod in m.named_modules():
        if name == "patch_embed.proj":  # xavier-uniform over the flattened 4x4x3 patch
            w = mod.weight.detach().reshape(64, -1)
            bound = math.sqrt(6 / (48 + 64))
            assert w.abs().max() <= bound and 0.9 < float(w.std()) / (bound / math.sqrt(3)) < 1.1
            assert not mod.bias.any()
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            w = mod.weight
            assert w.abs().max() <= 0.04 + 1e-7, name  # truncated at 2 std
            if w.numel() >= 4000:
                assert 0.015 < float(w.detach().std()) < 0.021, name
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
        elif isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and not mod.bias.any(), name
    for t in (m.cls_token, m.pos_embed):
        assert t.abs().max() <= 0.04 + 1e-7 and t.std() > 0.01
    assert torch.equal(m.blocks[0].ls1.gamma, torch.full((64,), 1e-4))


@pytest.mark.parametrize("kw,expect", [
    ({}, {"cls_token", "pos_embed"}),
    (dict(num_registers=2), {"cls_token", "reg_token", "pos_embed"}),
    (dict(pos_embed="sincos2d"), {"cls_token"}),
    (dict(class_token=False, pooling="mean"), {"pos_embed"}),
    (dict(class_token=False, pooling="mean", pos_embed="none"), set()),
])
def test_no_weight_decay_and_param_groups(tiny_config, kw, expect):
    m = ViT(tiny_config(**kw))
    assert m.no_weight_decay() == expect
    from vitkit.train.optim import param_groups  # the one place the optimizer groups are made

    decay, no_decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert nd == {n for n, p in m.named_parameters() if p.ndim <= 1} | expect
    assert d | nd == set(names.values()) and not d & nd
    assert all(n.endswith("weight") and "norm" not in n for n in d)


# --------------------------------------------------------------------------- staged forward
def test_staged_forward_and_attention_maps(tiny_config):
    m = ViT(tiny_config(depth=3, num_registers=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = m(x)
        logits2, attns = m(x, return_attention=True)
        feats = m.forward_features(x)
        t = m.embed(x)
        for b in m.blocks:
            t = b(t)
        t = m.norm(t)
        assert torch.allclose(feats, t, atol=1e-6)
        assert feats.shape == (2, 2 + 16, 32)
        assert torch.allclose(m.forward_head(feats), logits, atol=1e-6)
        assert torch.allclose(logits, logits2, atol=1e-5)
        assert torch.allclose(m.forward_head(feats, pre_logits=True), feats[:, 0], atol=1e-6)
    assert len(attns) == 3 and all(a.shape == (2, 4, 18, 18) for a in attns)
    assert torch.allclose(attns[1].sum(-1), torch.ones(2, 4, 18), atol=1e-5)


def test_num_classes_zero_returns_pooled_features(tiny_config):
    m = ViT(tiny_config(num_classes=0, pooling="mean", fc_norm=True)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = m(x)
        t = m.forward_features(x)
        assert torch.allclose(out, m.fc_norm(t[:, 1:].mean(1)), atol=1e-6)


def test_forward_intermediates_match_hooks(tiny_config):
    m = ViT(tiny_config(depth=4, num_registers=2)).eval()
    _randomize(m)
    seen = []
    hooks = [b.register_forward_hook(lambda mod, i, o: seen.append(o)) for b in m.blocks]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        m.forward_features(x)
        for h in hooks:
            h.remove()
        final, inter = m.forward_intermediates(x)
        assert len(inter) == 4 and all(torch.allclose(a, b) for a, b in zip(inter, seen))
        assert torch.allclose(final, m.forward_features(x), atol=1e-6)
        inter = m.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.allclose(inter[0], seen[0]) and torch.allclose(inter[1], seen[3])
        inter = m.forward_intermediates(x, indices=2, intermediates_only=True)  # last 2
        assert torch.allclose(inter[0], seen[2]) and torch.allclose(inter[1], seen[3])
        _, inter = m.forward_intermediates(x, indices=[1], norm=True)
        assert torch.allclose(inter[0], m.norm(seen[1]), atol=1e-6)
        maps = m.forward_intermediates(x, indices=[1], reshape=True, intermediates_only=True)
        assert maps[0].shape == (2, 32, 4, 4)
        # feature map [b, :, i, j] is patch token R + i*gw + j
        assert torch.equal(maps[0][1, :, 2, 3], seen[1][1, 3 + 2 * 4 + 3])  # R = 3: class token + 2 registers
        (fmap, prefix), = m.forward_intermediates(x, indices=[1], reshape=True, return_prefix_tokens=True,
                                                  intermediates_only=True)
        assert torch.equal(fmap, maps[0]) and torch.equal(prefix, seen[1][:, :3])
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(InputError):
            m.forward_intermediates(x, indices=bad)


def test_forward_intermediates_equal_timm():
    tm = VisionTransformer(**BASE_T).eval()
    ours = ViT(ViTConfig(**BASE_O)).eval()
    ours.load_state_dict(tm.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = ours.forward_intermediates(x, indices=[0, 1], norm=True, reshape=True, intermediates_only=True)
        b = tm.forward_intermediates(x, indices=[0, 1], norm=True, output_fmt="NCHW", intermediates_only=True)
    assert all((u - v).abs().max() < 1e-5 for u, v in zip(a, b))


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("shape,dtype,needles", [
    ((2, 1, 16, 16), torch.float32, ["3 input channel", "got 1"]),
    ((2, 3, 32, 32), torch.float32, ["16x16", "32x32"]),
    ((2, 3, 18, 16), torch.float32, ["16x16", "18x16", "not even divisible"]),
    ((3, 16, 16), torch.float32, ["4-D", "(3, 16, 16)", "unsqueeze"]),
    ((2, 3, 16, 16), torch.uint8, ["floating-point", "uint8"]),
    ((2, 3, 16, 16), torch.float64, ["torch.float32", "torch.float64"]),  # numpy's default dtype
])
def test_bad_input_errors(tiny_config, shape, dtype, needles):
    m = ViT(tiny_config())
    with pytest.raises(ValueError) as e:
        m(torch.zeros(shape, dtype=dtype))
    assert isinstance(e.value, InputError)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_autocast_and_half_models_still_accept_their_inputs(tiny_config):
    m = ViT(tiny_config()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)  # float32 input, bf16 compute: allowed
    assert y.dtype == torch.bfloat16 and (y.float() - m(x)).abs().max() < 0.1
    mb = ViT(tiny_config()).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert mb(x.bfloat16()).dtype == torch.bfloat16


def test_forward_head_rejects_2d(tiny_config):
    with pytest.raises(InputError, match=r"\(B, T, D\)"):
        ViT(tiny_config()).forward_head(torch.zeros(2, 32))


# --------------------------------------------------------------------------- the tutorials, as-is
def test_tutorial1_conv_input_layer():
    """32x32 RGB, 2 patches per row (16x16 patches, 4 of them), 384 dims, class token, learned pos."""
    m = ViT(ViTConfig(image_size=32, patch_size=16, dim=384, depth=1, num_heads=6, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = m.embed(x)
    assert t.shape == (2, 5, 384) and m.pos_embed.shape == (1, 5, 384)
    w, b = m.patch_embed.proj.weight, m.patch_embed.proj.bias
    # patch 1 = top-right 16x16 block, by hand
    hand = (w * x[1, None, :, :16, 16:]).sum(dim=(1, 2, 3)) + b
    assert torch.allclose(t[1, 2], hand + m.pos_embed[0, 2], atol=1e-5)
    # the class token is the same learned vector for every image (repeated over the batch)
    assert torch.allclose(t[0, 0], m.cls_token[0, 0] + m.pos_embed[0, 0])
    assert torch.equal(t[0, 0], t[1, 0])


def test_tutorial2_unfold_regression_sincos1d():
    """1-channel 60x100, patch 20: 15 tokens of 400 -> 768; zero class token; sin/cos over token
    index; pre-norm; MLP 1.5x the token length; final norm, token 0, one regression output."""
    c = ViTConfig(image_size=(60, 100), patch_size=20, in_channels=1, dim=768, depth=1, num_heads=8,
                  mlp_dim=600, pos_embed="sincos1d", patch_embed="unfold", task="regression", num_classes=1)
    m = ViT(c).eval()
    with torch.no_grad():
        m.cls_token.zero_()  # the tutorial's zero-initialised prediction token
    assert (c.num_patches, c.patch_dim, c.num_tokens) == (15, 400, 16)
    assert m.blocks[0].mlp.fc1.out_features == 600
    x = torch.rand(4, 1, 60, 100)
    with torch.no_grad():
        tok = F.unfold(x, 20, stride=20).transpose(1, 2)  # tutorial's tokenizer: (B, 15, 400)
        assert tok.shape == (4, 15, 400)
        lin = tok @ m.patch_embed.proj.weight.reshape(768, 400).t() + m.patch_embed.proj.bias
        t = m.embed(x)
        assert torch.allclose(t[:, 1:], lin + sincos_1d(16, 768)[1:], atol=1e-5)
        # zero class token + position 0 of the table: sin(0)=0, cos(0)=1
        assert torch.allclose(t[:, 0], torch.tensor([0.0, 1.0]).repeat(384).expand(4, -1))
        y = m(x)
    assert y.shape == (4, 1) and y.dtype == torch.float32
    assert "cls_token" in m.no_weight_decay() and "pos_embed" not in m.no_weight_decay()
    # regression: one small gradient step on the MSE lowers it
    target = torch.full((4, 1), 2.0)
    loss0 = F.mse_loss(m(x), target)
    loss0.backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= 1e-5 * p.grad
        assert F.mse_loss(m(x), target) < loss0


def test_tutorial3_einops_224_patch16_attention():
    einops = pytest.importorskip("einops")
    m = vitkit.create_model("vit_base_patch16_224", depth=1, patch_embed="rearrange", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        p = einops.rearrange(x, "b c (h s1) (w s2) -> b (h w) (s1 s2 c)", s1=16, s2=16)
        assert p.shape == (1, 196, 768)
        lin = nn.Linear(768, 768)
        lin.weight.copy_(m.patch_embed.proj.weight.permute(0, 2, 3, 1).reshape(768, 768))
        lin.bias.copy_(m.patch_embed.proj.bias)
        assert torch.allclose(m.patch_embed(x), lin(p), atol=1e-4)
        t = m.embed(x)
        assert t.shape == (1, 197, 768)
        # one fused qkv, heads split, einsum scores (scaled before softmax over keys), einsum on values
        blk = m.blocks[0]
        h = blk.norm1(t)
        q, k, v = einops.rearrange(blk.attn.qkv(h), "b n (three h d) -> three b h n d", three=3, h=12)
        att = torch.einsum("bhid,bhjd->bhij", q, k) * 64**-0.5
        att = att.softmax(dim=-1)
        out = einops.rearrange(torch.einsum("bhij,bhjd->bhid", att, v), "b h n d -> b n (h d)")
        _, maps = m(x, return_attention=True)
        assert torch.allclose(maps[0], att, atol=1e-5)
        assert torch.allclose(blk.attn(h), blk.attn.proj(out), atol=1e-4)


def test_tutorial5_keras_cifar_post_norm():
    """32x32x3, patch 4 (8x8 grid of 48 values), Dense to 64, 4 post-norm blocks of 4 heads, ReLU MLP,
    dropout 0.1, head Dense(128, GELU) + Dropout + Dense(10)."""
    c = ViTConfig(image_size=32, patch_size=4, dim=64, depth=4, num_heads=4, mlp_dim=128, norm_first=False,
                  act="relu", dropout=0.1, head_hidden_dim=128, head_act="gelu", head_dropout=0.1,
                  num_classes=10)
    m = ViT(c)
    assert (c.grid_size, c.patch_dim, c.num_tokens) == ((8, 8), 48, 65)
    assert isinstance(m.norm, nn.Identity)
    # by hand: patch 48*64+64, cls 64, pos 65*64, 4 blocks, head 64*128+128 + 128*10+10
    block = 4 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    hand = 48 * 64 + 64 + 64 + 65 * 64 + 4 * block + 64 * 128 + 128 + 128 * 10 + 10
    assert m.num_params() == hand == count_params(c)
    x = torch.rand(8, 3, 32, 32)  # rescaled to [0, 1]
    with torch.no_grad():
        m.eval()
        p = m(x).softmax(-1)
        assert torch.allclose(p.sum(-1), torch.ones(8)) and torch.equal(m(x).softmax(-1), p)
        m.train()  # dropout active: outputs differ between calls
        assert not torch.allclose(m(x), m(x))
        # any batch size, unlike the Keras graph with its baked-in batch
        m.eval()
        assert torch.allclose(m(x[:3]), m(x)[:3], atol=1e-5)


@pytest.mark.parametrize("dim,depth,heads", [(768, 12, 12), (1024, 24, 16), (1280, 32, 16)])
def test_tutorial5_wide_versions_param_counts(dim, depth, heads):
    c = ViTConfig(image_size=32, patch_size=4, dim=dim, depth=depth, num_heads=heads, norm_first=False,
                  act="relu", dropout=0.1, head_hidden_dim=128, head_act="gelu", num_classes=10)
    with torch.device("meta"):
        m = ViT(c)
    total = m.num_params()
    blocks = sum(p.numel() for p in m.blocks.parameters())
    assert total == count_params(c)
    per_block = 12 * dim * dim + 13 * dim  # 4 D^2 attention + 8 D^2 MLP; biases and norms
    assert blocks == depth * per_block
    assert blocks / total > 0.98
    assert math.isclose(total, depth * per_block + 48 * dim + dim + dim + 65 * dim + dim * 128 + 128 + 1290)

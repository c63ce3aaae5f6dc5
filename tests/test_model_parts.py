"""The config-chosen parts of the model, each against timm's implementation of the same thing
with the same weights (names map 1:1): norm_pre, patch bias off, MAP pooling, SwiGLU, RMSNorm,
head without bias, DeiT distillation token, registers, dynamic image size; plus config
validation and serialisation of the new fields."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vitkit import ViT, ViTConfig
from vitkit.bench.flops import count_params
from vitkit.errors import ConfigError, InputError

timm = pytest.importorskip("timm")
from timm.layers import SwiGLUPacked  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

BASE_T = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=7)
BASE_O = dict(image_size=32, patch_size=8, dim=48, depth=2, num_heads=4, mlp_dim=96, num_classes=7)

CASES = {
    "norm_pre": (dict(pre_norm=True), dict(norm_pre=True, patch_bias=False)),  # timm's pre_norm drops the bias
    "map": (dict(global_pool="map"), dict(pooling="map")),
    "map_no_cls_gelu_tanh": (dict(global_pool="map", class_token=False, act_layer="gelu_tanh"),
                             dict(pooling="map", class_token=False, act="gelu_tanh")),
    "map_registers": (dict(global_pool="map", reg_tokens=2, no_embed_class=True),
                      dict(pooling="map", num_registers=2, pos_embed_prefix=False)),
    # timm's mlp_ratio counts fc1's output (gate + value); ours is the gated width.
    "swiglu": (dict(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=4.0), dict(mlp_layer="swiglu", act="silu")),
    "swiglu_layer_scale_registers": (
        dict(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=4.0, init_values=0.1, reg_tokens=4,
             no_embed_class=True),
        dict(mlp_layer="swiglu", layer_scale=0.1, num_registers=4, pos_embed_prefix=False)),
    "rmsnorm": (dict(norm_layer="rmsnorm"), dict(norm_layer="rmsnorm")),
    "rmsnorm_mean": (dict(norm_layer="rmsnorm", global_pool="avg"), dict(norm_layer="rmsnorm", pooling="mean",
                                                                            fc_norm=True)),
    "clip_like": (dict(pre_norm=True, act_layer="quick_gelu", norm_layer="rmsnorm"),
                  dict(norm_pre=True, patch_bias=False, act="quick_gelu", norm_layer="rmsnorm")),
}


def _perturb(m: nn.Module) -> None:
    with torch.no_grad():  # move every tensor off its init value (norms ones, biases zeros, latent)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _compare(tm: nn.Module, ours: ViT, x: torch.Tensor) -> None:
    ours.load_state_dict(tm.state_dict(), strict=True)  # identical names and shapes by design
    with torch.no_grad():
        a, b = ours(x), tm(x)
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-5
        assert (ours.forward_features(x) - tm.forward_features(x)).abs().max() < 1e-5
        assert (ours.forward_head(ours.forward_features(x), pre_logits=True)
                - tm.forward_head(tm.forward_features(x), pre_logits=True)).abs().max() < 1e-5
        # the comparison can fail: one changed weight moves the output
        ours.blocks[0].mlp.fc1.weight[0, 0] += 1.0
        assert (ours(x) - b).abs().max() > 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_part_equals_timm(case):
    tkw, okw = CASES[case]
    tm = VisionTransformer(**{**BASE_T, **tkw}).eval()
    _perturb(tm)
    ours = ViT(ViTConfig(**{**BASE_O, **okw})).eval()
    assert count_params(ours.config) == ours.num_params()
    _compare(tm, ours, torch.randn(3, 3, 32, 32))


def test_patch_bias_off_and_head_bias_off_equal_timm():
    """timm has no flag for either: its modules with the bias removed are the oracle."""
    tm = VisionTransformer(**BASE_T).eval()
    tm.patch_embed.proj.bias = None
    tm.head = nn.Linear(48, 7, bias=False)
    _perturb(tm)
    ours = ViT(ViTConfig(**BASE_O, patch_bias=False, head_bias=False)).eval()
    assert ours.patch_embed.proj.bias is None and ours.head.bias is None
    assert count_params(ours.config) == ours.num_params()
    _compare(tm, ours, torch.randn(2, 3, 32, 32))


def test_dist_token_equals_timm_deit():
    # (timm's distilled model always sizes its table for the prefix: no_embed_class breaks it there)
    tm = VisionTransformerDistilled(**BASE_T).eval()
    _perturb(tm)
    ours = ViT(ViTConfig(**BASE_O, dist_token=True)).eval()
    assert ours.num_prefix_tokens == 2 and count_params(ours.config) == ours.num_params()
    _compare(tm, ours, torch.randn(3, 3, 32, 32))
    # training: the average by default; with distilled_training the pair, as timm
    ours.load_state_dict(tm.state_dict())
    ours.train(), tm.train()
    x = torch.randn(2, 3, 32, 32)
    assert (ours(x) - tm(x)).abs().max() < 1e-5
    ours.distilled_training = True
    tm.set_distilled_training(True)
    (a, ad), (b, bd) = ours(x), tm(x)
    assert (a - b).abs().max() < 1e-5 and (ad - bd).abs().max() < 1e-5
    assert (a - ad).abs().max() > 1e-4  # two different heads


def test_dist_token_last_block_reads_two_tokens():
    m = ViT(ViTConfig(**BASE_O, dist_token=True)).eval()
    _perturb(m)
    seen = []
    m.blocks[-1].register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = m(x)
        full = m.forward_head(m.forward_features(x))
    assert seen == [(2, 2, 48), (2, 18, 48)]  # forward: class + dist token only; features: all
    assert (fast - full).abs().max() < 1e-5


# --------------------------------------------------------------------------- dynamic image size
DYN = {
    "learned": ({}, {}),
    "registers_no_embed_class": (dict(reg_tokens=2, no_embed_class=True),
                                 dict(num_registers=2, pos_embed_prefix=False)),
    "map_swiglu": (dict(global_pool="map", mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=4.0),
                   dict(pooling="map", mlp_layer="swiglu", act="silu")),
}


@pytest.mark.parametrize("case", sorted(DYN))
@pytest.mark.parametrize("hw", [(32, 32), (48, 24)])  # same grid; taller and narrower
def test_dynamic_img_size_equals_timm(case, hw):
    tkw, okw = DYN[case]
    tm = VisionTransformer(**{**BASE_T, **tkw}, dynamic_img_size=True).eval()
    _perturb(tm)
    ours = ViT(ViTConfig(**{**BASE_O, **okw}, dynamic_img_size=True)).eval()
    ours.load_state_dict(tm.state_dict(), strict=True)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert (ours(x) - tm(x)).abs().max() < 1e-5
        assert (ours.forward_features(x) - tm.forward_features(x)).abs().max() < 1e-5
        a = ours.forward_intermediates(x, indices=[0, 1], norm=True, reshape=True, intermediates_only=True)
        b = tm.forward_intermediates(x, indices=[0, 1], norm=True, output_fmt="NCHW", intermediates_only=True)
    assert a[0].shape == (2, 48, hw[0] // 8, hw[1] // 8)
    assert all((u - v).abs().max() < 1e-5 for u, v in zip(a, b))


@pytest.mark.parametrize("pos", ["learned", "sincos2d", "sincos1d"])
def test_dynamic_img_size_equals_set_image_size(pos, tiny_config):
    kw = dict(pos_embed=pos) if pos != "sincos1d" else dict(pos_embed=pos, class_token=False, pooling="mean")
    dyn = ViT(tiny_config(dynamic_img_size=True, **kw)).eval()
    _perturb(dyn)
    x = torch.randn(2, 3, 24, 12)
    with torch.no_grad():
        out, attn = dyn(x, return_attention=True)
        ref = ViT(tiny_config(**kw)).eval()
        ref.load_state_dict(dyn.state_dict())
        ref.set_image_size((24, 12))
        ref_out, ref_attn = ref(x, return_attention=True)
        assert (out - ref_out).abs().max() < 1e-6
        T = dyn.num_prefix_tokens + 6 * 3
        assert attn[0].shape == (2, 4, T, T) and all((a - b).abs().max() < 1e-6 for a, b in zip(attn, ref_attn))
    with pytest.raises(InputError, match="divisible by the patch"):
        dyn(torch.randn(1, 3, 18, 16))


def test_dynamic_pos_cache_follows_updates_and_keeps_autograd(tiny_config):
    m = ViT(tiny_config(dynamic_img_size=True)).eval()
    x = torch.randn(1, 3, 24, 24)
    f = m.forward_features  # every token: directly moved by its position row
    with torch.no_grad():
        a = f(x)
        assert torch.equal(f(x), a) and len(m._pos_cache) == 1  # cached
        m.pos_embed.add_(torch.randn_like(m.pos_embed))  # in place (an optimizer step): must not serve the old table
        b = f(x)
    ref = ViT(tiny_config()).eval()
    ref.load_state_dict(m.state_dict())
    ref.set_image_size(24)
    with torch.no_grad():
        assert (b - ref.forward_features(x)).abs().max() < 1e-6 and (b - a).abs().max() > 1e-2
    # training: gradients flow into the learned table through the resampling
    m.train()
    m(x).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0
    assert not any("cache" in k for k in m.state_dict())


# --------------------------------------------------------------------------- config
NEW_FIELDS = dict(norm_layer="rmsnorm", mlp_layer="swiglu", norm_pre=True, patch_bias=False, pooling="map",
                  head_bias=False, dynamic_img_size=True)


def test_new_fields_round_trip_and_old_configs_load(tiny_config, tmp_path):
    c = tiny_config(**NEW_FIELDS)
    assert ViTConfig.from_dict(json.loads(c.to_json())) == c
    old = tiny_config().to_dict()
    for k in (*NEW_FIELDS, "dist_token"):
        if k != "pooling":
            old.pop(k)
    assert ViTConfig.from_dict(old) == tiny_config()  # a config.json from before the fields
    d = tiny_config(dist_token=True)
    assert ViTConfig.from_dict(d.to_dict()).num_prefix_tokens == 2


@pytest.mark.parametrize("kw,needles", [
    (dict(norm_layer="batchnorm"), ["norm_layer", "layernorm", "rmsnorm", "batchnorm"]),
    (dict(mlp_layer="geglu"), ["mlp_layer", "swiglu", "geglu"]),
    (dict(pooling="attn"), ["pooling", "map", "attn"]),
    (dict(norm_pre=1), ["norm_pre", "True or False"]),
    (dict(patch_bias="no"), ["patch_bias"]),
    (dict(head_bias=None), ["head_bias"]),
    (dict(dynamic_img_size="yes"), ["dynamic_img_size"]),
    (dict(dist_token=True, pooling="mean"), ["dist_token", "pooling='cls'", "'mean'"]),
    (dict(dist_token=True, class_token=False, pooling="mean"), ["dist_token", "class_token"]),
])
def test_new_fields_validated(tiny_config, kw, needles):
    with pytest.raises(ConfigError) as e:
        tiny_config(**kw)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_new_parts_are_none_when_off(tiny_config):
    """Disabled parts are absent (no call, no parameters), so default models keep their state dict."""
    m = ViT(tiny_config())
    assert m.norm_pre is None and m.attn_pool is None and m.dist_token is None and m.head_dist is None
    assert not any(k.startswith(("norm_pre", "attn_pool", "dist_token", "head_dist")) for k in m.state_dict())


def test_model_package_imports_nothing_from_interop_and_io_nothing_from_above():
    """The layers: the model package may write through vitkit.io but imports nothing from interop,
    except ``ViT.export_to``'s call-time import of vitkit.interop.export (export and the format
    modules never import the model, so it is no cycle: tests/test_architecture.py); vitkit.io
    imports nothing from interop, the model, training or any layer above it."""
    import ast
    from pathlib import Path

    import vitkit

    root = Path(vitkit.__file__).parent

    def imports(f: Path):
        """(line, function or None, absolute vitkit module) of every import in ``f``."""
        pkg = ".".join(("vitkit", *f.relative_to(root).parent.parts))
        tree = ast.parse(f.read_text())
        owner = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    owner.setdefault(id(node), fn.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                for a in node.names:
                    yield node.lineno, owner.get(id(node)), f"{mod}.{a.name}" if mod == base and node.level else mod
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield node.lineno, owner.get(id(node)), a.name

    found = []
    for f in sorted((root / "model").glob("*.py")):
        for line, fn, mod in imports(f):
            if mod.startswith("vitkit.interop") and (f.name, fn, mod) != ("vit.py", "export_to", "vitkit.interop.export"):
                found.append(f"model/{f.name}:{line} ({fn or 'module level'}) imports {mod}")
    above = ("vitkit.interop", "vitkit.model", "vitkit.train", "vitkit.eval", "vitkit.features", "vitkit.infer",
             "vitkit.viz", "vitkit.cli", "vitkit.data", "vitkit.text")
    for line, fn, mod in imports(root / "io.py"):
        if mod.startswith(above):
            found.append(f"io.py:{line} ({fn or 'module level'}) imports {mod}")
    assert not found, found
    # the persistence methods are the class's own, not attached from outside
    assert "save_pretrained" in ViT.__dict__ and "export_to" in ViT.__dict__ and "preprocess_cfg" in ViT.__dict__

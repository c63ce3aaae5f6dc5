"""ViTConfig: JSON round-trip, validation errors, preset names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vitkit
from vitkit.config import PRESETS, ViTConfig, get_config, list_models, resolve_name
from vitkit.errors import ConfigError


def test_json_round_trip_non_square(tmp_path):
    c = ViTConfig(image_size=(60, 100), patch_size=(20, 10), in_channels=1, num_classes=1, dim=48, depth=2,
                  num_heads=4, mlp_dim=600, pos_embed="sincos1d", task="regression", layer_scale=1e-5,
                  num_registers=2, head_hidden_dim=7, qk_scale=0.3)
    d = json.loads(c.to_json())
    assert d["image_size"] == [60, 100] and d["patch_size"] == [20, 10]
    back = ViTConfig.from_dict(d)
    assert back == c
    assert back.image_hw == (60, 100) and back.patch_hw == (20, 10) and back.num_patches == 3 * 10
    p = tmp_path / "c.json"
    c.to_json(p)
    assert ViTConfig.from_json(p) == c
    # square sizes serialise as a plain int and come back as one
    sq = ViTConfig(image_size=(32, 32), patch_size=(8, 8), dim=32, depth=1, num_heads=2)
    assert sq.to_dict()["image_size"] == 32 and ViTConfig.from_dict(sq.to_dict()) == sq


def test_replace_keeps_other_fields():
    c = get_config("vit_small_patch16_224")
    d = c.replace(num_classes=10, image_size=32)
    assert (d.num_classes, d.image_hw, d.dim, d.depth) == (10, (32, 32), 384, 12)
    assert c.num_classes == 1000  # the preset itself is untouched
    assert get_config("vit_small_patch16_224", num_classes=3).num_classes == 3
    assert PRESETS["vit_small_patch16_224"].num_classes == 1000


@pytest.mark.parametrize("bad,suggest", [("dimm", "dim"), ("num_head", "num_heads"), ("zzz_qqq", None)])
def test_unknown_keys_rejected_with_suggestion(bad, suggest):
    with pytest.raises(ConfigError) as e:
        ViTConfig.from_dict({"dim": 32, "num_heads": 2, bad: 1})
    assert bad in str(e.value)
    if suggest:
        assert f"did you mean '{suggest}'" in str(e.value)
    with pytest.raises(ValueError):
        ViTConfig().replace(**{bad: 1})


BAD = [
    (dict(dim=100, num_heads=3), ["dim=100", "num_heads=3"]),
    (dict(image_size=30, patch_size=16), ["30x30", "16x16"]),
    (dict(image_size=(32, 30), patch_size=8), ["32x30", "8x8"]),
    (dict(pos_embed="learnt"), ["pos_embed", "'learned'"]),
    (dict(pooling="avg"), ["pooling", "'avg'"]),
    (dict(act="gleu"), ["act", "'gelu'"]),
    (dict(task="classify"), ["task", "classification"]),
    (dict(patch_embed="convolution"), ["patch_embed", "conv"]),
    (dict(pooling="cls", class_token=False), ["class_token"]),
    (dict(num_classes=-1), ["num_classes", "-1"]),
    (dict(depth=0), ["depth", "0"]),
    (dict(dropout=1.0), ["dropout", "1.0"]),
    (dict(image_size=(1, 2, 3)), ["image_size", "(1, 2, 3)"]),
    (dict(image_size=True), ["image_size"]),
    (dict(patch_size=0), ["patch_size"]),
    (dict(dim=30, num_heads=3, pos_embed="sincos2d"), ["sincos2d", "30"]),
    (dict(fc_norm=True, norm_first=False, pooling="mean"), ["fc_norm"]),
    (dict(num_registers=-1), ["num_registers"]),
    (dict(num_registers=1.5), ["num_registers", "1.5"]),
    (dict(mlp_ratio=0.001), ["mlp_ratio", "0.001"]),
    (dict(mlp_ratio=-1.0), ["mlp_ratio"]),
    (dict(mlp_dim=2.5), ["mlp_dim", "2.5"]),
    (dict(mlp_dim=0), ["mlp_dim"]),
    (dict(head_hidden_dim=3.5), ["head_hidden_dim"]),
    (dict(norm_eps=0.0), ["norm_eps"]),
    (dict(qk_scale=-1.0), ["qk_scale"]),
    (dict(qkv_bias="no"), ["qkv_bias", "'no'"]),
    (dict(class_token=1), ["class_token"]),
    (dict(in_channels=3.0), ["in_channels", "3.0"]),
]


@pytest.mark.parametrize("kw,needles", BAD, ids=[str(k) for k, _ in BAD])
def test_validation_errors_are_value_errors_with_details(kw, needles):
    with pytest.raises(ValueError) as e:
        ViTConfig(**kw)
    assert isinstance(e.value, ConfigError)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_paper_names_resolve():
    assert resolve_name("ViT-B/16") == "vit_base_patch16_224"
    assert resolve_name("ViT-L/16@384") == "vit_large_patch16_384"
    assert resolve_name("vit-ti/16") == "vit_tiny_patch16_224"
    assert resolve_name("ViT-H/14") == "vit_huge_patch14_224"
    assert resolve_name("vit_base_patch16_224.augreg_in21k") == "vit_base_patch16_224"
    c = get_config("ViT-S/32")
    assert (c.dim, c.depth, c.num_heads, c.hidden_dim, c.patch_hw) == (384, 12, 6, 1536, (32, 32))


@pytest.mark.parametrize("name,close", [("vit_bsae_patch16_224", "vit_base_patch16_224"),
                                        ("vit_large_patch16_244", "vit_large_patch16_224"),
                                        ("ViT-B/15", None)])
def test_unknown_names_suggest(name, close):
    with pytest.raises(ValueError) as e:
        vitkit.create_model(name)
    assert repr(name) in str(e.value)
    if close:
        assert close in str(e.value)


def test_list_models_and_variant_table():
    names = list_models()
    assert len(names) == len(PRESETS) and "vit_base_patch16_224" in names
    base = list_models("vit_base*")
    assert base and all(n.startswith("vit_base") for n in base)
    # the paper's table (Ti/S from DeiT)
    expect = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
              "huge": (1280, 32, 16)}
    for n in names:
        c = PRESETS[n]
        variant = n.split("_")[1]
        assert (c.dim, c.depth, c.num_heads) == expect[variant]
        assert c.hidden_dim == 4 * c.dim
        assert f"patch{c.patch_hw[0]}_{c.image_hw[0]}" in n


def test_errors_survive_python_O():
    """User errors are raised explicitly, not with asserts that -O strips."""
    code = (
        "import sys, torch, vitkit\n"
        "from vitkit import ViTConfig, ViT\n"
        "print('optimize', sys.flags.optimize)\n"
        "for kw in [dict(dim=100, num_heads=3), dict(image_size=30, patch_size=16)]:\n"
        "    try:\n        ViTConfig(**kw)\n    except ValueError as e:\n        print('OK', e)\n"
        "m = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2, num_classes=3))\n"
        "for x in [torch.zeros(1, 1, 16, 16), torch.zeros(1, 3, 20, 20), torch.zeros(3, 16, 16),\n"
        "          torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 18, 16)]:\n"
        "    try:\n        m(x)\n    except ValueError as e:\n        print('OK', e)\n"
    )
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "optimize 1" in r.stdout  # asserts really are off in the child
    assert r.stdout.count("OK ") == 7, r.stdout

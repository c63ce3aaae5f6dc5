"""Hints are used, never asked for again: a non-square grid loads from every format when the user
passes ``image_size=(H, W)`` next to an ``arch=`` whose own (square) size does not fit, for tables
with and without prefix rows; unknown activation names in a checkpoint config are errors naming
the value. Oracle: the model the files were written from. (torchvision's ViT is square only; its
reader takes the same hints, tested in test_interop_torchvision.)"""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.errors import CheckpointError

HW = (32, 48)
ARCH = vitkit.ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2)  # square: does not fit


def make(**kw):
    cfg = dict(image_size=HW, patch_size=8, num_classes=5, dim=32, depth=2, num_heads=2)
    return randomize(vitkit.ViT(vitkit.ViTConfig(**{**cfg, **kw})))


CASES = {
    "timm_prefix_rows": (dict(), "timm", lambda m, d: m.export_to("timm", d / "t") / "model.safetensors", {}),
    "timm_no_prefix_rows": (dict(pos_embed_prefix=False, num_registers=2), "timm",
                            lambda m, d: m.export_to("timm", d / "t") / "model.safetensors", {}),
    "jax_vision_transformer": (dict(act="gelu_tanh"), "jax", lambda m, d: m.export_to("jax", d / "v.npz"), {}),
    "jax_big_vision_no_prefix_rows": (dict(act="gelu_tanh", pos_embed_prefix=False), "jax",
                                      lambda m, d: m.export_to("jax", d / "b.npz", layout="big_vision"), {}),
    "hf": (dict(norm_eps=1e-12), "hf", lambda m, d: m.export_to("hf", d / "hf"), {}),
    "dinov2_hub_prefix_rows": (dict(num_classes=0, layer_scale=1e-5), "dinov2",
                               lambda m, d: m.export_to("dinov2", d / "d.safetensors"), {}),
    "dinov2_hub_registers": (dict(num_classes=0, layer_scale=1e-5, num_registers=4, pos_embed_prefix=False),
                             "dinov2", lambda m, d: m.export_to("dinov2", d / "d.safetensors"), {}),
    "openai_clip": (dict(num_classes=16, norm_pre=True, patch_bias=False, head_bias=False, act="quick_gelu",
                         norm_eps=1e-5), "openai_clip", lambda m, d: m.export_to("openai_clip", d / "c.safetensors"),
                    {"act": "quick_gelu"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_non_square_grid_uses_the_image_size_hint(name, tmp_path):
    kw, fmt, write, extra = CASES[name]
    model = make(**kw)
    path = write(model, tmp_path)
    got = vitkit.from_pretrained(path, arch=ARCH, image_size=HW, **extra)
    assert got.pretrained_info["format"] == fmt
    assert got.config.image_hw == HW and got.config.pos_embed_prefix == model.config.pos_embed_prefix
    assert not any("resampled" in n for n in got.load_report.notes)
    x = torch.randn(2, 3, *HW)
    with torch.no_grad():
        assert max_diff(got(x), model(x)) <= 1e-5


def test_non_square_without_any_hint_names_what_to_pass(tmp_path):
    # 32x40: 4x5 patches + a class row = 21 rows, square neither way (HW's 24 + 1 = 25 would read
    # as a 5x5 table without prefix rows: the documented ambiguity of config-less timm files)
    path = make(image_size=(32, 40)).export_to("timm", tmp_path / "t") / "model.safetensors"
    with pytest.raises(CheckpointError, match=r"image_size=\(H, W\)") as e:
        vitkit.from_pretrained(path, arch=ARCH)
    assert "(32, 32)" in str(e.value) or "32" in str(e.value)  # says which size it tried


def test_timm_unknown_activation_is_an_error_naming_it(tmp_path):
    out = make().export_to("timm", tmp_path / "t")
    meta = json.loads((out / "config.json").read_text())
    meta["model_args"]["act_layer"] = "swishy_gelu"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="swishy_gelu"):
        vitkit.from_pretrained(out)
    # the user's word replaces the file's
    assert vitkit.from_pretrained(out, act="gelu").config.act == "gelu"


def test_hf_unknown_activation_is_an_error_naming_it(tmp_path):
    out = make(norm_eps=1e-12).export_to("hf", tmp_path / "hf")
    meta = json.loads((out / "config.json").read_text())
    meta["hidden_act"] = "mish_v9"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="mish_v9"):
        vitkit.from_pretrained(out)

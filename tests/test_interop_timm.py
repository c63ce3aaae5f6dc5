"""timm checkpoints load exactly: random-initialised timm ViTs, saved by timm's own
``save_for_hf`` (hub dir) or as bare state dicts, give the same logits through vitkit."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.errors import CheckpointError

timm = pytest.importorskip("timm")
from timm.models import save_for_hf  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

BASE = dict(embed_dim=64, depth=2, num_heads=4)

CONFIGS = {
    "patch32": dict(img_size=64, patch_size=32, num_classes=7),
    "input384ish": dict(img_size=96, patch_size=16, num_classes=10),  # 384-style: bigger grid (6x6)
    "no_qkv_bias": dict(img_size=32, patch_size=8, num_classes=10, qkv_bias=False),
    "non_square": dict(img_size=(32, 48), patch_size=8, num_classes=3),
    "mean_pool_fc_norm": dict(img_size=32, patch_size=8, num_classes=10, global_pool="avg"),
    "registers": dict(img_size=32, patch_size=8, num_classes=10, reg_tokens=4, no_embed_class=True),
    "layer_scale": dict(img_size=32, patch_size=8, num_classes=10, init_values=1e-5),
    "no_class_token": dict(img_size=32, patch_size=8, num_classes=5, class_token=False, global_pool="avg"),
}


def make_timm(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return randomize(VisionTransformer(**{**BASE, **kw}))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_timm_hub_dir_exact(name, tmp_path):
    kw = CONFIGS[name]
    ref = make_timm(**kw)
    ref.pretrained_cfg = {"architecture": "vit_custom", "input_size": (3, *ref.patch_embed.img_size),
                          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                          "crop_pct": 0.9, "num_classes": ref.num_classes}
    save_for_hf(ref, tmp_path, safe_serialization=True, model_args={**BASE, **{
        k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}})
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
    assert model.pretrained_info["format"] == "timm"
    assert model.preprocess_cfg["crop_pct"] == pytest.approx(0.9)
    assert model.preprocess_cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize("name", ["patch32", "registers", "layer_scale", "mean_pool_fc_norm", "no_qkv_bias"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_exact(name, suffix, tmp_path):
    """Bare state dicts: the config is inferred from tensor shapes (heads from num_heads=)."""
    ref = make_timm(**CONFIGS[name])
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    else:
        torch.save(ref.state_dict(), path)
    model = vitkit.from_pretrained(path, num_heads=4)
    c = model.config
    assert (c.dim, c.depth, c.num_heads) == (64, 2, 4)
    x = torch.randn(3, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5


def test_heads_default_warns_and_is_documented(tmp_path):
    ref = make_timm(img_size=32, patch_size=8, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="num_heads=1"):
        model = vitkit.from_pretrained(tmp_path / "w.pth")  # dim 64 -> head_dim 64 rule -> 1 head
    assert model.config.num_heads == 1


def test_real_preset_shape_named_architecture(tmp_path):
    """A timm-named architecture gives the heads from the preset (ViT-Ti: 3 heads, meta device is not
    loadable, so build tiny-depth real-width)."""
    ref = make_timm(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=4)
    torch.save(ref.state_dict(), tmp_path / "vit_tiny.pth")
    model = vitkit.from_pretrained(tmp_path / "vit_tiny.pth")  # 192 wide -> 3 heads (DeiT-Ti)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5


def test_strict_report_lists_problems(tmp_path):
    ref = make_timm(img_size=32, patch_size=8, num_classes=3)
    sd = ref.state_dict()
    sd.pop("blocks.1.norm2.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained(tmp_path / "broken.pth", num_heads=4)
    msg = str(e.value)
    assert "missing (1): blocks.1.norm2.weight" in msg and "unexpected (1): blocks.0.extra.weight" in msg
    model = vitkit.from_pretrained(tmp_path / "broken.pth", num_heads=4, strict=False)
    rep = model.pretrained_info["report"]
    assert rep["missing"] == ["blocks.1.norm2.weight"] and rep["unexpected"] == ["blocks.0.extra.weight"]


def test_mis_shaped_listed(tmp_path):
    ref = make_timm(img_size=32, patch_size=8, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped: blocks\.0\.mlp\.fc1\.weight"):
        # arch says mlp 4x but an override forces another width: shapes disagree, and are named
        vitkit.from_pretrained(tmp_path / "w.pth", num_heads=4, mlp_dim=128)


def test_timm_export_roundtrip(tmp_path):
    """vitkit -> timm dir -> timm VisionTransformer(**model_args) gives identical logits."""
    model = randomize(vitkit.create_model(vitkit.ViTConfig(
        image_size=32, patch_size=8, num_classes=6, dim=64, depth=2, num_heads=4, num_registers=2,
        layer_scale=1e-5, pooling="mean", fc_norm=True, pos_embed_prefix=False)))
    out = model.export_to("timm", tmp_path / "timm_dir")
    meta = json.loads((out / "config.json").read_text())
    from safetensors.torch import load_file

    ref = VisionTransformer(**meta["model_args"]).eval()
    ref.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) == 0.0
    back = vitkit.from_pretrained(out)
    with torch.no_grad():
        assert max_diff(back(x), model(x)) == 0.0


def test_resample_and_grey_match_timm_helpers(tmp_path):
    """image_size= and in_channels=1 agree with timm's own helpers (resample_abs_pos_embed,
    adapt_input_conv), and the resampled model equals timm's model with that table."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    ref = make_timm(img_size=32, patch_size=8, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    big = vitkit.from_pretrained(tmp_path / "w.pth", num_heads=4, image_size=48)
    table = resample_abs_pos_embed(ref.pos_embed.data, new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    assert max_diff(big.pos_embed, table) <= 1e-6
    ref48 = make_timm(img_size=48, patch_size=8, num_classes=3)
    sd = dict(ref.state_dict(), pos_embed=table)
    ref48.load_state_dict(sd)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert max_diff(big(x), ref48(x)) <= 1e-5
    grey = vitkit.from_pretrained(tmp_path / "w.pth", num_heads=4, in_channels=1)
    assert max_diff(grey.patch_embed.proj.weight, adapt_input_conv(1, ref.patch_embed.proj.weight.data)) <= 1e-6
    assert any("summed" in n for n in grey.pretrained_info["report"]["notes"])


def test_real_preset_shapes_inferred_on_meta():
    """The real vit_base_patch16_224 / vit_small_patch16_384 state dicts (meta device, shapes only)
    give exactly vitkit's presets when the config is inferred from shapes alone."""
    from vitkit.interop.timm import infer_config

    for name in ("vit_base_patch16_224", "vit_small_patch16_384"):
        with torch.device("meta"):
            sd = timm.create_model(name, pretrained=False).state_dict()
        cfg = infer_config(sd, {}, name)
        preset = vitkit.get_config(name)
        for field in ("image_size", "patch_size", "dim", "depth", "num_heads", "hidden_dim", "num_classes",
                      "qkv_bias", "pooling", "pos_embed_prefix"):
            assert getattr(cfg, field) == getattr(preset, field), (name, field)


def test_arch_gives_heads_and_non_square_grid(tmp_path):
    """A bare non-square state dict: the grid (4x8 vs 8x4 vs ...) and heads come from arch=."""
    ref = make_timm(img_size=(32, 64), patch_size=8, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="not a square grid"):
        vitkit.from_pretrained(tmp_path / "w.pth", num_heads=4)
    arch = vitkit.ViTConfig(image_size=(32, 64), patch_size=8, dim=64, depth=2, num_heads=4)
    model = vitkit.from_pretrained(tmp_path / "w.pth", arch=arch)
    assert model.config.image_hw == (32, 64) and model.config.num_heads == 4
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5

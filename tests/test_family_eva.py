"""timm's Eva family (EVA-02, Perception Encoder, the RoPE ViTs) read by vitkit and written back; timm's own
``Eva`` is the oracle: random-weight models saved as timm's push_to_hub lays them out (config.json with
``architecture``, ``model_args``, ``pretrained_cfg`` + model.safetensors), loaded by
``vitkit.from_pretrained``; logits and ``forward_features`` within 1e-5 (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from vitkit.io import save_state_dict

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)
CASES = {  # name -> (extra model_args, input size)
    "eva02_tiny_patch14_224": (dict(img_size=28, patch_size=7), 28),  # fused qkv + q/v bias, packed SwiGLU
    "eva02_base_patch14_224": (dict(img_size=28, patch_size=7), 28),  # q/k/v apart, SwiGLU with an MLP norm
    "eva02_base_patch16_clip_224": (dict(img_size=32, patch_size=8), 32),  # + attention inner norm, token pool
    "eva02_small_patch14_224": (dict(img_size=28, patch_size=7, dynamic_img_size=True), 42),  # any size
    "vit_pe_core_tiny_patch16_384": (dict(img_size=32, patch_size=8), 32),  # 8-head attention pool over all tokens
    "vit_pe_lang_large_patch14_448": (dict(img_size=32, patch_size=8), 32),  # layer scale, no final norm
    "vit_pe_spatial_tiny_patch16_512": (dict(img_size=32, patch_size=8, dynamic_img_size=True), 48),
    "vit_small_patch16_rope_224": (dict(img_size=32, patch_size=8), 32),  # RoPE-ViT axial
    "vit_small_patch16_rope_mixed_224": (dict(img_size=32, patch_size=8), 32),  # learned per-block frequencies
    "vit_small_patch16_rope_mixed_ape_224": (dict(img_size=32, patch_size=8, dynamic_img_size=True), 40),
    "vit_base_patch16_rope_reg1_gap_256": (dict(img_size=32, patch_size=8), 32),  # timm SBB: register, gap
}


def make_timm(name: str, extra: dict):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, **TINY, **extra).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return ref


def save_hub(ref, name: str, model_args: dict, path):
    path.mkdir()
    save_state_dict(ref.state_dict(), path / "model.safetensors")
    size = model_args["img_size"]
    (path / "config.json").write_text(json.dumps({
        "architecture": name, "num_classes": TINY["num_classes"], "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic", "crop_pct": 1.0}}))
    return path


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_timm_eva_hub_dir_matches_timm_and_exports_back(name, tmp_path):
    extra, other = CASES[name]
    ref = make_timm(name, extra)
    model = vitkit.from_pretrained(save_hub(ref, name, {**TINY, **extra}, tmp_path / "hub")).eval()
    assert model.load_report.ok
    sizes = {extra["img_size"], other}
    with torch.no_grad():
        for s in sorted(sizes):
            x = torch.randn(2, 3, s, s)
            assert max_diff(model(x), ref(x)) <= 1e-5, s
            assert max_diff(model.forward_features(x), ref.forward_features(x)) <= 1e-5, s
        # vitkit -> timm hub dir -> timm (strict) gives the same outputs
        out = model.export_to("timm", tmp_path / "back")
        meta = json.loads((out / "config.json").read_text())
        again = timm.create_model(meta["architecture"], pretrained=False, **meta["model_args"]).eval()
        from safetensors.torch import load_file

        again.load_state_dict(load_file(out / "model.safetensors"), strict=True)
        x = torch.randn(2, 3, extra["img_size"], extra["img_size"])
        assert max_diff(again(x), ref(x)) <= 1e-5
        assert max_diff(vitkit.from_pretrained(out).eval()(x), ref(x)) <= 1e-5


def test_bare_eva_state_dict_needs_its_rope_named(tmp_path):
    from vitkit.errors import CheckpointError

    extra = CASES["vit_small_patch16_rope_mixed_224"][0]
    ref = make_timm("vit_small_patch16_rope_mixed_224", extra)
    save_state_dict(ref.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="which rotary embedding"):
        vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2)
    model = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2, rope="mixed", rope_indexing="xy", image_size=32,
                                   pooling="cls").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("args", [dict(use_post_norm=True), dict(qk_norm=True), dict(rope_type="mrope")])
def test_eva_layouts_vitkit_does_not_reproduce_are_refused(args, tmp_path):
    from vitkit.errors import CheckpointError

    name = "eva02_tiny_patch14_224"
    extra = dict(img_size=28, patch_size=7)
    ref = make_timm(name, {**extra, **args})
    with pytest.raises(CheckpointError, match=next(iter(args))):
        vitkit.from_pretrained(save_hub(ref, name, {**TINY, **extra, **args}, tmp_path / "hub"))

"""The original repositories' checkpoints: facebookresearch/perception_models (PE) and baaivision/EVA
(EVA-02). Random timm models are written in the original layout (tests/family_helpers.py); timm's own
``checkpoint_filter_fn`` must map that file back to the timm state dict exactly (which proves the
layout), and ``vitkit.from_pretrained`` of the file (format detected) must match timm within 1e-5."""

from __future__ import annotations

import pytest
import torch

import vitkit
from family_helpers import eva02_rope, same_state, timm_to_eva02, timm_to_pe
from test_family_eva import TINY, make_timm, max_diff
from vitkit.errors import CheckpointError
from vitkit.interop.formats import detect_format

timm_eva = pytest.importorskip("timm.models.eva")

PE_ARGS = dict(img_size=32, patch_size=8, ref_feat_shape=(4, 4))  # the table's grid is PE's reference grid
PE_CASES = {  # name -> prefix of the saved file ("visual.": a whole PE CLIP with a text tower)
    "vit_pe_core_tiny_patch16_384": "",  # class token, 8-head attention pool, ln_post, proj
    "vit_pe_lang_large_patch14_448": "visual.",  # layer scale, no ln_post, no pool
    "vit_pe_core_gigantic_patch14_448": "",  # no class token: RoPE offset 0
    "vit_pe_spatial_tiny_patch16_512": "",
}


def _pe_timm(name):
    ref = make_timm(name, PE_ARGS)
    with torch.no_grad():
        ref.head.bias.zero_()  # PE's proj has no bias
    return ref


@pytest.mark.parametrize("name", list(PE_CASES))
def test_perception_models_checkpoint_matches_timm(name, tmp_path):
    ref = _pe_timm(name)
    prefix = PE_CASES[name]
    original = timm_to_pe(ref.state_dict(), prefix)
    if prefix:  # the text tower beside it (its own transformer.resblocks, at the top level)
        original.update({"transformer.resblocks.0.ln_1.weight": torch.ones(16), "logit_scale": torch.ones(())})
    same_state(timm_eva.checkpoint_filter_fn(original, ref), ref.state_dict())
    path = tmp_path / "pe.pt"
    torch.save(original, path)
    assert detect_format(path) == "perception_models"
    model = vitkit.from_pretrained(path, num_heads=2)
    assert model.load_report.ok and model.pretrained_info["format"] == "perception_models"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        assert max_diff(model.forward_features(x), ref.forward_features(x)) <= 1e-5


def test_pe_settings_not_in_the_weights_are_noted_and_hints_win(tmp_path):
    ref = _pe_timm("vit_pe_core_tiny_patch16_384")
    path = tmp_path / "pe.pt"
    torch.save(timm_to_pe(ref.state_dict()), path)
    notes = " ".join(vitkit.from_pretrained(path, num_heads=2).load_report.notes)
    assert "8 heads" in notes and "grid offset 1" in notes and "reference grid (4, 4)" in notes
    model = vitkit.from_pretrained(path, num_heads=2, map_num_heads=4, rope_grid_offset=0.0)
    assert model.config.map_num_heads == 4 and model.config.rope_grid_offset == 0.0


EVA_CASES = {  # name -> (timm args, wrapper key, prefix, RoPE reference grid)
    "eva02_tiny_patch14_224": (dict(img_size=28, patch_size=7), "model", "", 16),  # fused qkv, xformers w12 / w3
    "eva02_base_patch14_224": (dict(img_size=28, patch_size=7), "model_ema", "", 16),  # q/k/v apart, w1 w2 w3, ffn_ln
    "eva02_base_patch16_clip_224": (dict(img_size=32, patch_size=8), None, "visual.", 16),  # EVA-CLIP: inner_attn_ln
    "eva02_small_patch14_224": (dict(img_size=28, patch_size=7, ref_feat_shape=(8, 8)), "module", "", 8),
}


@pytest.mark.parametrize("name", list(EVA_CASES))
def test_baai_eva02_checkpoint_matches_timm(name, tmp_path):
    args, wrap, prefix, pt = EVA_CASES[name]
    ref = make_timm(name, args)
    grid = args["img_size"] // args["patch_size"]
    original = timm_to_eva02(ref.state_dict(), TINY["embed_dim"] // TINY["num_heads"], pt, grid, prefix)
    if prefix:
        original["text.token_embedding.weight"] = torch.zeros(4, 8)
    saved = {wrap: original} if wrap else original
    same_state(timm_eva.checkpoint_filter_fn(saved, ref), ref.state_dict())
    path = tmp_path / "eva02.pth"
    torch.save(saved, path)
    assert detect_format(path) == "baai_eva"
    model = vitkit.from_pretrained(path)  # heads and reference grid from the RoPE buffers
    assert model.load_report.ok and model.config.num_heads == 2 and model.config.rope_ref_grid == (pt, pt)
    x = torch.randn(2, 3, args["img_size"], args["img_size"])
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        assert max_diff(model.forward_features(x), ref.forward_features(x)) <= 1e-5


def test_eva02_rope_that_differs_from_the_buffers_is_an_error(tmp_path):
    ref = make_timm("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7))
    original = timm_to_eva02(ref.state_dict(), 16, 16, 4)
    path = tmp_path / "eva02.pth"
    torch.save(original, path)
    with pytest.raises(CheckpointError, match=r"reference grid \(8, 8\).*differs from the checkpoint's rope"):
        vitkit.from_pretrained(path, rope_ref_grid=(8, 8))
    original["rope.freqs_cos"], original["rope.freqs_sin"] = eva02_rope(8, 16, 4)  # a head width of 8: 4 heads
    torch.save(original, path)
    with pytest.raises(CheckpointError, match=r"rope.freqs_cos is \(16, 8\): 16 positions at head width 8 \(4 heads\)"):
        vitkit.from_pretrained(path, num_heads=2)

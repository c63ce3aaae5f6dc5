"""ONNX export of the new families (EVA-02, Perception Encoder with its attention pool, RoPE-Mixed,
AIMv2): onnxruntime's output equals vitkit's within 1e-4, at a second size where the model takes any
size (dynamic height and width). NaFlex input is refused with the reason rather than exported as a
graph of plain images."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_family_eva import TINY, make_timm, max_diff, save_hub
from vitkit.errors import ConfigError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CASES = {  # name -> (timm model_args, a second input size for dynamic models, or None)
    "eva02_base_patch14_224": (dict(img_size=28, patch_size=7, dynamic_img_size=True), 42),  # table + axial RoPE
    "vit_pe_core_tiny_patch16_384": (dict(img_size=32, patch_size=8), None),  # 8-head attention pool over all tokens
    "vit_small_patch16_rope_mixed_ape_224": (dict(img_size=32, patch_size=8, dynamic_img_size=True), 48),
}


def _check(model, path, sizes):
    out = vitkit.export_to(model, "onnx", path)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for hw in sizes:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {"pixel_values": x.numpy()})[0]
        assert got.shape == want.shape and abs(got - want).max() <= 1e-4, hw


@pytest.mark.parametrize("name", list(CASES))
def test_timm_eva_families_export_to_onnx(name, tmp_path):
    args, other = CASES[name]
    model = vitkit.from_pretrained(save_hub(make_timm(name, args), name, {**TINY, **args}, tmp_path / "hub"))
    s = args["img_size"]
    _check(model, tmp_path / "m.onnx", [(s, s)] + ([(other, s)] if other else []))


def test_aimv2_exports_to_onnx(tmp_path):
    from test_family_aimv2 import _hf_config, _randomize

    transformers = pytest.importorskip("transformers")
    ref = _randomize(transformers.Aimv2VisionModel(_hf_config(is_native=True, use_head=True)))
    ref.save_pretrained(tmp_path / "hf")
    model = vitkit.from_pretrained(tmp_path / "hf")  # RMSNorm after the patches, SwiGLU, AIMv2's pool, sin-cos
    assert model.config.dynamic_img_size
    _check(model, tmp_path / "m.onnx", [(28, 28), (42, 28)])


def test_naflex_input_is_refused_not_exported_as_plain_images(tmp_path):
    model = vitkit.ViT(vitkit.ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2, num_classes=3,
                                        class_token=False, pooling="mean", dynamic_img_size=True,
                                        pos_embed_prefix=False, naflex_max_patches=16))
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        with pytest.raises(ConfigError, match="NaFlex input"):
            vitkit.export_to(model, fmt, tmp_path / name)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("kw", [dict(global_pool="map", reg_tokens=1),  # no layer scale: the siglip entrypoint
                                dict(global_pool="avg", reg_tokens=2, fc_norm=True, init_values=1e-5,
                                     pos_embed_interp_mode="bilinear")])
def test_naflex_timm_export_is_timms_naflexvit(kw, tmp_path):
    """timm export of a NaFlex model writes timm's NaFlexVit (not a VisionTransformer that drops the
    NaFlex input): timm loads it strictly and gives the same outputs on a packed batch."""
    import json

    from safetensors.torch import load_file

    from test_naflex import timm_inputs, timm_naflexvit
    from vitkit.io import save_state_dict
    from vitkit.model.naflex import pack

    timm = pytest.importorskip("timm")
    ref = timm_naflexvit(**kw)
    (tmp_path / "hub").mkdir()
    save_state_dict(dict(ref.state_dict()), tmp_path / "hub" / "model.safetensors")
    args = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed_grid_size=[4, 4], **kw)
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": "naflexvit_base_patch16_gap",
                                                              "model_args": args, "pretrained_cfg": {}}))
    model = vitkit.from_pretrained(tmp_path / "hub", naflex_max_patches=40)
    out = model.export_to("timm", tmp_path / "out")
    meta = json.loads((out / "config.json").read_text())
    back = timm.create_model(meta["architecture"], pretrained=False, **meta["model_args"]).eval()
    back.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    batch = pack([torch.randn(3, h, w) for h, w in [(12, 28), (16, 16), (40, 8)]], 4)
    again = vitkit.from_pretrained(out)
    assert again.config.naflex_max_patches == 40
    with torch.no_grad():
        want = ref(batch.patches, **timm_inputs(batch))
        assert max_diff(back(batch.patches, **timm_inputs(batch)), want) <= 1e-5
        assert max_diff(again(batch), want) <= 1e-5

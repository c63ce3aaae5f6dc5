"""DINOv2 (+ registers) loads exactly from Hugging Face dirs (file and transformers-5 in-memory
names), timm state dicts and the original facebookresearch/dinov2 hub layout; resampling to
another size reproduces each source's own interpolation. Oracles: transformers' Dinov2Model /
Dinov2WithRegistersModel, timm's VisionTransformer, timm's ``_convert_dinov2`` (for the hub layout)."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import load_saved_timm, max_diff, randomize
from vitkit.io import save_state_dict

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
HF_CONFIGS = {
    "plain_28": dict(image_size=28),
    "registers_42": dict(image_size=42, num_register_tokens=4),
    "patch16_eps": dict(image_size=32, patch_size=16, layer_norm_eps=1e-5, num_register_tokens=2),
}


def make_hf(**kw):
    torch.manual_seed(0)
    if kw.get("num_register_tokens"):
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**{**BASE, **kw}))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**{**BASE, **kw}))
    return randomize(model)


def hf_out(model, x):
    with torch.no_grad():
        return model(pixel_values=x)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_dinov2_dir_exact(name, tmp_path):
    kw = HF_CONFIGS[name]
    ref = make_hf(**kw)
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    s = kw["image_size"]
    x = torch.randn(2, 3, s, s)
    out = hf_out(ref, x)
    with torch.no_grad():
        assert max_diff(model(x), out.pooler_output) <= 1e-5  # class token after the final norm
        assert max_diff(model.forward_features(x), out.last_hidden_state) <= 1e-5
    assert model.config.num_registers == kw.get("num_register_tokens", 0)
    assert model.preprocess_cfg["mean"] == [0.485, 0.456, 0.406]
    assert any("mask token" in n for n in model.load_report.notes)


def test_hf_dinov2_in_memory_names(tmp_path):
    """transformers 5 renames the tensors in memory (q_proj, o_proj): a state_dict() saved as is loads."""
    ref = make_hf(**HF_CONFIGS["registers_42"])
    sd = ref.state_dict()
    assert any(".attention.q_proj." in k for k in sd)
    save_state_dict({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        assert max_diff(model(x), hf_out(ref, x).pooler_output) <= 1e-5


@pytest.mark.parametrize("name,size", [("plain_28", 56), ("plain_28", (42, 56)), ("registers_42", 56),
                                       ("registers_42", (28, 56))])
def test_hf_dinov2_other_size_matches_hf_interpolation(name, size, tmp_path):
    """HF Dinov2 interpolates bicubically to the target grid without antialias, Dinov2WithRegisters
    with antialias: loading at that size gives the same numbers as each (square and non-square)."""
    ref = make_hf(**HF_CONFIGS[name])
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path, image_size=size)
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert max_diff(model(x), hf_out(ref, x).pooler_output) <= 1e-5
    assert any(" as hf" in n for n in model.load_report.notes)


def _timm(variant, **kw):
    torch.manual_seed(0)
    m = timm.create_model(variant, pretrained=False, embed_dim=32, depth=2, num_heads=2, **kw)
    return randomize(m)


@pytest.mark.parametrize("variant,kw", [
    ("vit_small_patch14_dinov2", dict(img_size=28)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=42)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=(28, 42))),
    ("vit_giant_patch14_dinov2", dict(img_size=28)),  # SwiGLUPacked
])
def test_timm_dinov2_state_dict_exact(variant, kw, tmp_path):
    ref = _timm(variant, **kw)
    model, x = load_saved_timm(ref, kw["img_size"], tmp_path)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        assert max_diff(model.forward_features(x), ref.forward_features(x)) <= 1e-5


def _hub_from_timm(ref) -> dict[str, torch.Tensor]:
    """The documented mapping timm -> original hub layout (inverse of timm's _convert_dinov2): the
    register tokens are ``register_tokens``, the class row goes back in front of the table (a zero
    row, the class token keeping the sum), and a mask token is added."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.randn(1, sd["cls_token"].shape[-1])
    return sd


@pytest.mark.parametrize("variant,img", [("vit_small_patch14_dinov2", 28), ("vit_small_patch14_reg4_dinov2", 42)])
def test_original_hub_layout_exact_and_timm_converter_agrees(variant, img, tmp_path):
    from timm.models.vision_transformer import _convert_dinov2

    ref = _timm(variant, img_size=img)
    hub = _hub_from_timm(ref)
    # independent oracle: timm's own converter turns the hub dict back into a model equal to ref
    back = _timm(variant, img_size=img)
    back.load_state_dict(_convert_dinov2(dict(hub), back))
    save_state_dict(hub, tmp_path / "dinov2_hub.safetensors")
    assert vitkit.interop.detect_format(tmp_path / "dinov2_hub.safetensors") == "dinov2"
    model = vitkit.from_pretrained(tmp_path / "dinov2_hub.safetensors", num_heads=2)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        assert max_diff(model(x), back(x)) <= 1e-5
        assert max_diff(back(x), ref(x)) <= 1e-5
    assert any("mask_token ignored" in n for n in model.load_report.notes)
    # and vitkit's export writes the same layout back (one table, both directions)
    out = vitkit.interop.dinov2.export_hub(model, tmp_path / "again.safetensors")
    again = vitkit.from_pretrained(out, num_heads=2)
    with torch.no_grad():
        assert max_diff(again(x), model(x)) <= 1e-6


def _original_interpolate(pos_embed, h, w, patch, offset=0.1):
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding (models/
    vision_transformer.py), transcribed: scale factor (g + offset) / M, bicubic, no antialias."""
    import math

    N = pos_embed.shape[1] - 1
    cls, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = h // patch, w // patch
    M = int(math.sqrt(N))
    sx, sy = float(w0 + offset) / M, float(h0 + offset) / M
    patch_pos = torch.nn.functional.interpolate(patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2),
                                                scale_factor=(sx, sy), mode="bicubic", antialias=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls.unsqueeze(0), patch_pos), dim=1)


def test_original_hub_other_size_uses_the_offset_interpolation(tmp_path):
    ref = _timm("vit_small_patch14_dinov2", img_size=28)
    save_state_dict(_hub_from_timm(ref), tmp_path / "hub.safetensors")
    model = vitkit.from_pretrained(tmp_path / "hub.safetensors", num_heads=2, image_size=(42, 70))
    want = _original_interpolate(ref.pos_embed.detach(), 42, 70, 14)
    assert max_diff(model.pos_embed, want) <= 1e-6
    # and it differs from HF's size-based interpolation (the point of naming each one)
    from vitkit.model.pos_embed import resample_hf
    assert max_diff(resample_hf(ref.pos_embed.detach(), (3, 5), (2, 2), 1), want) > 1e-4


# ----------------------------------------------------------------------------- SwiGLU (giant)
def test_hf_dinov2_swiglu_file_and_memory_names(tmp_path):
    """use_swiglu_ffn: files hold mlp.weights_in (packed [w1; w2]); transformers 5 splits it into
    gate_proj / up_proj in memory. Both load to mlp_layer='swiglu' with the same outputs."""
    ref = make_hf(image_size=28, use_swiglu_ffn=True)
    ref.save_pretrained(tmp_path / "file")
    sd = ref.state_dict()
    assert any(".mlp.gate_proj." in k for k in sd)
    (tmp_path / "mem").mkdir()
    save_state_dict({k: v.contiguous() for k, v in sd.items()}, tmp_path / "mem" / "model.safetensors")
    (tmp_path / "mem" / "config.json").write_text(json.dumps(ref.config.to_dict()))
    x = torch.randn(2, 3, 28, 28)
    want = hf_out(ref, x).pooler_output
    for d in ("file", "mem"):
        model = vitkit.from_pretrained(tmp_path / d)
        assert model.config.mlp_layer == "swiglu"
        with torch.no_grad():
            assert max_diff(model(x), want) <= 1e-5


def test_original_hub_giant_swiglu_w12_w3(tmp_path):
    from timm.models.vision_transformer import _convert_dinov2

    ref = _timm("vit_giant_patch14_dinov2", img_size=28)
    hub = _hub_from_timm(ref)
    hub = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in hub.items()}
    back = _timm("vit_giant_patch14_dinov2", img_size=28)
    back.load_state_dict(_convert_dinov2(dict(hub), back))
    save_state_dict(hub, tmp_path / "g.safetensors")
    model = vitkit.from_pretrained(tmp_path / "g.safetensors", num_heads=2)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert max_diff(model(x), back(x)) <= 1e-5
        assert max_diff(back(x), ref(x)) <= 1e-6
    out = vitkit.interop.dinov2.export_hub(model, tmp_path / "again.safetensors")
    from vitkit.interop.common import read_state_dict
    assert "blocks.0.mlp.w12.weight" in read_state_dict(out)


def test_timm_dinov2_dynamic_size_matches_timm(tmp_path):
    """dynamic_img_size: any input size at run time, the table resampled as timm does (timm's own
    dynamic_img_size path is the oracle; a non-square input on a register model)."""
    ref = _timm("vit_small_patch14_reg4_dinov2", img_size=28, dynamic_img_size=True)
    save_state_dict(ref.state_dict(), tmp_path / "w.safetensors")
    model = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2, dynamic_img_size=True)
    for hw in ((28, 28), (42, 56)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert max_diff(model(x), ref(x)) <= 1e-5


def test_saved_vitkit_copy_keeps_the_source_resampling(tmp_path):
    """An HF Dinov2 converted and saved by vitkit, loaded again at another size, still resamples as
    HF does (the config carries the implementation's name)."""
    ref = make_hf(**HF_CONFIGS["plain_28"])
    ref.save_pretrained(tmp_path / "hf")
    vitkit.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "vk")
    model = vitkit.from_pretrained(tmp_path / "vk", image_size=(42, 56))
    assert model.config.pos_resample == "hf" and "pos_resample" not in model.pretrained_info
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        assert max_diff(model(x), hf_out(ref, x).pooler_output) <= 1e-5

"""CLIP image towers load exactly from Hugging Face (CLIPVisionModel, ...WithProjection, whole
CLIPModel), OpenAI / OpenCLIP state dicts and timm ``vit_*_clip_*``; the activation comes from the
source's config or the user, never silently. Oracles: transformers' CLIP classes, timm's
VisionTransformer and its ``_convert_openai_clip`` (for the OpenAI layout)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import vitkit
from test_interop_common import images, load_saved_hf, max_diff, randomize
from vitkit.io import save_state_dict

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
HF_CONFIGS = {
    "p16_32_quick": dict(image_size=32, patch_size=16),
    "p14_28_gelu": dict(image_size=28, patch_size=14, hidden_act="gelu"),
    "p32_64": dict(image_size=64, patch_size=32, layer_norm_eps=1e-6),
}


def _vision(**kw):
    return transformers.CLIPVisionConfig(**{**VISION, **kw})


def hf_model(kind, **kw):
    torch.manual_seed(0)
    if kind == "vision":
        m = transformers.CLIPVisionModel(_vision(**kw))
    elif kind == "projection":
        m = transformers.CLIPVisionModelWithProjection(_vision(projection_dim=24, **kw))
    else:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        m = transformers.CLIPModel(transformers.CLIPConfig(vision_config={**VISION, **kw}, text_config=text,
                                                           projection_dim=24))
    return randomize(m)


def hf_image_output(m, x, **kw):
    with torch.no_grad():
        if isinstance(m, transformers.CLIPModel):
            out = m.get_image_features(pixel_values=x, **kw)
            return out if torch.is_tensor(out) else out.pooler_output
        out = m(pixel_values=x, **kw)
        return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


@pytest.mark.parametrize("kind", ["vision", "projection", "clipmodel"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_clip_dir_exact(kind, name, tmp_path):
    kw = HF_CONFIGS[name]
    ref = hf_model(kind, **kw)
    model = load_saved_hf(ref, tmp_path)
    x = images(kw["image_size"])
    with torch.no_grad():
        assert max_diff(model(x), hf_image_output(ref, x)) <= 1e-5
    assert model.config.act == ("gelu" if kw.get("hidden_act") == "gelu" else "quick_gelu")
    assert model.config.num_classes == (0 if kind == "vision" else 24)
    assert model.preprocess_cfg["mean"][0] == pytest.approx(0.48145466)
    if kind == "clipmodel":
        assert any("text tower" in n for n in model.load_report.notes)


def test_hf_clip_tokens_are_after_post_layernorm(tmp_path):
    """forward_features = every token after post_layernorm; HF's last_hidden_state is before it."""
    ref = hf_model("vision", **HF_CONFIGS["p16_32_quick"])
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = ref(pixel_values=x).last_hidden_state
        assert max_diff(model.forward_features(x), ref.post_layernorm(hidden)) <= 1e-5
        _, inter = model.forward_intermediates(x, indices=[-1])
        assert max_diff(inter[0], hidden) <= 1e-5


@pytest.mark.parametrize("size", [48, (32, 64)])
def test_hf_clip_other_size_matches_interpolate_pos_encoding(size, tmp_path):
    ref = hf_model("projection", **HF_CONFIGS["p16_32_quick"])
    model = load_saved_hf(ref, tmp_path, image_size=size)
    x = images(size)
    with torch.no_grad():
        assert max_diff(model(x), hf_image_output(ref, x, interpolate_pos_encoding=True)) <= 1e-5


# ----------------------------------------------------------------------------- timm and OpenAI layouts
def timm_clip(variant="vit_base_patch16_clip_quickgelu_224", **kw):
    torch.manual_seed(0)
    m = timm.create_model(variant, pretrained=False, embed_dim=32, depth=2, num_heads=2, **kw)
    return randomize(m)


def openai_from_timm(ref) -> dict[str, torch.Tensor]:
    """The documented mapping timm -> OpenAI CLIP (inverse of timm's _convert_openai_clip):
    patch_embed.proj -> visual.conv1, cls_token (1,1,D) -> class_embedding (D,), pos_embed
    (1,T,D) -> positional_embedding (T,D), norm_pre -> ln_pre, blocks.N -> transformer.resblocks.N
    (norm1/2 -> ln_1/2, attn.qkv -> attn.in_proj_, attn.proj -> attn.out_proj, mlp.fc1/fc2 ->
    mlp.c_fc/c_proj), norm -> ln_post, head.weight (E,D) -> proj (D,E); plus a text tower."""
    out = {}
    for k, v in ref.state_dict().items():
        if k == "head.bias":
            assert not v.any()
            continue
        if k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
            continue
        for a, b in (("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
                     ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"),
                     ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            k = k.replace(a, b)
        if k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        out["visual." + k] = v
    out["token_embedding.weight"] = torch.randn(10, 32)
    out["text_projection"] = torch.randn(32, 16)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def _zero_head_bias(m):
    with torch.no_grad():
        m.head.bias.zero_()
    return m


@pytest.mark.parametrize("kw", [dict(img_size=32, patch_size=16, num_classes=24),
                                dict(img_size=28, patch_size=14, num_classes=0),
                                dict(img_size=(32, 64), patch_size=32, num_classes=16)])
def test_openai_state_dict_exact_and_timm_converter_agrees(kw, tmp_path):
    from timm.models.vision_transformer import _convert_openai_clip

    ref = timm_clip(**kw)
    if kw["num_classes"]:
        _zero_head_bias(ref)
    sd = openai_from_timm(ref)
    back = timm_clip(**kw)
    back.load_state_dict(_convert_openai_clip(dict(sd), back))  # independent oracle for the mapping
    save_state_dict(sd, tmp_path / "open_clip_model.safetensors")
    path = tmp_path / "open_clip_model.safetensors"
    assert vitkit.interop.detect_format(path) == "openai_clip"
    hint = {"image_size": kw["img_size"]} if isinstance(kw["img_size"], tuple) else {}
    model = vitkit.from_pretrained(path, act="quick_gelu", num_heads=2, **hint)  # heads: invisible in weights
    size = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert max_diff(back(x), ref(x)) <= 1e-6
        assert max_diff(model(x), back(x)) <= 1e-5
    assert any("text tower" in n for n in model.load_report.notes)


def test_openai_state_dict_activation_never_silent(tmp_path):
    ref = _zero_head_bias(timm_clip(img_size=32, patch_size=16, num_classes=24))
    save_state_dict(openai_from_timm(ref), tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="QuickGELU"):
        model = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2)
    assert model.config.act == "quick_gelu"
    assert any("act='gelu'" in n for n in model.load_report.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gelu = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2, act="gelu")
    assert gelu.config.act == "gelu"
    # an OpenCLIP hub dir says it in open_clip_config.json
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "quick_gelu": False, "vision_cfg": {"width": 32, "head_width": 16, "image_size": 32}}}))
    oc = vitkit.from_pretrained(tmp_path / "w.safetensors")
    assert oc.config.act == "gelu" and oc.config.num_heads == 2


@pytest.mark.parametrize("variant,act", [("vit_base_patch16_clip_224", "gelu"),
                                         ("vit_base_patch16_clip_quickgelu_224", "quick_gelu")])
def test_timm_clip_exact(variant, act, tmp_path):
    ref = timm_clip(variant, img_size=32, patch_size=16, num_classes=24)
    save_state_dict(ref.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": variant, "num_classes": 24, "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                                    "img_size": 32, "patch_size": 16},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}))
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
    assert model.config.act == act and model.config.norm_eps == 1e-5 and model.config.norm_pre

"""Every family exports back: to timm (the exported state dict loads strictly into timm's own
VisionTransformer / VisionTransformerDistilled built from the exported arguments, same outputs;
vitkit reads the directory back), to the original layouts (dinov2 hub, OpenAI CLIP, big_vision
npz) and to ONNX (onnxruntime gives the same outputs). Format names come from one registry."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.interop.common import read_state_dict

timm = pytest.importorskip("timm")

FAMILIES = {
    "dinov2_reg": dict(image_size=28, patch_size=14, num_classes=0, num_registers=4, pos_embed_prefix=False,
                       layer_scale=1e-5),
    "dinov2_giant_swiglu": dict(image_size=28, patch_size=14, num_classes=0, layer_scale=1e-5, mlp_layer="swiglu",
                                act="silu", mlp_dim=48),
    "clip": dict(image_size=32, patch_size=16, num_classes=24, norm_pre=True, patch_bias=False, head_bias=False,
                 act="quick_gelu", norm_eps=1e-5),
    "siglip": dict(image_size=32, patch_size=16, num_classes=0, class_token=False, pos_embed_prefix=False,
                   pooling="map", act="gelu_tanh"),
    "deit_distilled": dict(image_size=(32, 48), patch_size=16, num_classes=5, dist_token=True),
    "deit3": dict(image_size=32, patch_size=16, num_classes=5, layer_scale=1e-5, pos_embed_prefix=False),
}


def family_model(name):
    cfg = vitkit.ViTConfig(**{**dict(dim=32, depth=2, num_heads=2), **FAMILIES[name]})
    return randomize(vitkit.ViT(cfg))


def _x(model):
    return torch.randn(2, 3, *model.config.image_hw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_timm_loads_into_timm_and_back(name, tmp_path):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from vitkit.interop.timm import to_timm_kwargs

    model = family_model(name)
    out = model.export_to("timm", tmp_path / "timm")
    cls = VisionTransformerDistilled if model.config.dist_token else VisionTransformer
    peer = cls(**to_timm_kwargs(model.config)).eval()
    peer.load_state_dict(read_state_dict(out / "model.safetensors"))  # strict: every name and shape
    x = _x(model)
    with torch.no_grad():
        assert max_diff(peer(x), model(x)) <= 1e-5
        again = vitkit.from_pretrained(out)
        assert max_diff(again(x), model(x)) <= 1e-5


@pytest.mark.slow  # ~10 s per family on 2 cores (the torch.export-based ONNX exporter)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_onnx_every_family(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = family_model(name)
    path = model.export_to("onnx", tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _x(model)
    with torch.no_grad():
        want = model(x)
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    assert abs(torch.from_numpy(got) - want).max().item() <= 1e-4


@pytest.mark.parametrize("name,fmt,suffix", [("dinov2_reg", "dinov2", ".safetensors"),
                                             ("dinov2_giant_swiglu", "dinov2", ".safetensors"),
                                             ("clip", "openai_clip", ".safetensors")])
def test_export_original_layouts_round_trip(name, fmt, suffix, tmp_path):
    model = family_model(name)
    out = model.export_to(fmt, tmp_path / f"w{suffix}")
    assert vitkit.interop.detect_format(out) == fmt
    kw = {"act": model.config.act} if fmt == "openai_clip" else {}
    again = vitkit.from_pretrained(out, num_heads=2, **kw)
    x = _x(model)
    with torch.no_grad():
        assert max_diff(again(x), model(x)) <= 1e-5


def test_one_registry_of_format_names():
    from vitkit.cli import convert, export
    from vitkit.interop import FORMATS
    from vitkit.interop.export import EXPORT_FORMATS
    from vitkit.interop.formats import READ_FORMATS, WRITE_FORMATS, canonical

    assert FORMATS == READ_FORMATS and EXPORT_FORMATS == WRITE_FORMATS
    assert {"dinov2", "openai_clip", "hf", "timm", "jax"} <= set(READ_FORMATS)
    assert canonical("open_clip") == "openai_clip" and canonical("transformers", writing=True) == "hf"
    import argparse

    for mod, names in ((convert, READ_FORMATS), (export, WRITE_FORMATS)):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        fmt = next(a for a in p._actions if a.dest == "format")
        assert tuple(fmt.choices) == tuple(names)
    with pytest.raises(vitkit.errors.ConfigError, match="must be one of"):
        canonical("caffe")


HF_EXPORTS = {  # family -> (transformers class, how it answers model(x))
    "dinov2_reg": ("Dinov2WithRegistersModel", lambda o: o.pooler_output),
    "dinov2_giant_swiglu": ("Dinov2Model", lambda o: o.pooler_output),
    "clip": ("CLIPVisionModelWithProjection", lambda o: o.image_embeds),
    "siglip": ("SiglipVisionModel", lambda o: o.pooler_output),
    "deit_distilled_square": ("DeiTForImageClassificationWithTeacher", lambda o: o.logits),
}


@pytest.mark.parametrize("name", list(HF_EXPORTS))
def test_export_hf_loads_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    cls_name, answer = HF_EXPORTS[name]
    if name == "deit_distilled_square":
        model = randomize(vitkit.ViT(vitkit.ViTConfig(image_size=32, patch_size=16, num_classes=5, dim=32, depth=2,
                                                      num_heads=2, dist_token=True, norm_eps=1e-12)))
    else:
        model = family_model(name)
    out = model.export_to("hf", tmp_path / "hf")
    assert vitkit.interop.detect_format(out) == "hf"
    peer = getattr(transformers, cls_name).from_pretrained(out).eval()
    x = _x(model)
    with torch.no_grad():
        assert max_diff(answer(peer(pixel_values=x)), model(x)) <= 1e-5
        again = vitkit.from_pretrained(out)
        assert max_diff(again(x), model(x)) <= 1e-5


@pytest.mark.parametrize("part", ["mlp_norm", "attn_norm", "no_final_norm", "pe_pool", "naflex"])
@pytest.mark.parametrize("fmt", ["hf", "dinov2", "openai_clip", "jax", "torchvision"])
def test_layouts_without_a_part_refuse_it(tmp_path, part, fmt):
    """EVA-02 / Perception Encoder parts and NaFlex input exist in timm's Eva / NaFlexVit layouts only:
    every other writer refuses such a model (a ConfigError) instead of writing a plain ViT that loses them."""
    import vitkit
    from vitkit.errors import ConfigError

    kw = {"mlp_norm": dict(mlp_norm=True), "attn_norm": dict(attn_norm=True), "no_final_norm": dict(final_norm=False),
          "pe_pool": dict(pooling="map", map_num_heads=2, class_token=False),
          "naflex": dict(naflex_max_patches=16, dynamic_img_size=True, class_token=False, pooling="mean",
                         pos_embed_prefix=False)}[part]
    m = vitkit.ViT(vitkit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=4, num_classes=3, **kw))
    with pytest.raises(ConfigError):
        vitkit.export_to(m, fmt, tmp_path / "out")
    assert not any(tmp_path.iterdir())

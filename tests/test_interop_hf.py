"""Hugging Face transformers ViT directories load exactly (both key spellings), and vitkit's HF
export loads back into transformers with identical logits."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize, tiny

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig as HFConfig  # noqa: E402
from transformers import ViTForImageClassification, ViTModel  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

CONFIGS = {
    "default_eps_1e-12": dict(image_size=32, patch_size=8, num_labels=10),
    "patch32": dict(image_size=64, patch_size=32, num_labels=7),
    "input384ish": dict(image_size=96, patch_size=16, num_labels=10),
    "no_qkv_bias": dict(image_size=32, patch_size=8, num_labels=10, qkv_bias=False),
    "eps_1e-6_gelu_tanh": dict(image_size=32, patch_size=8, num_labels=4, layer_norm_eps=1e-6,
                               hidden_act="gelu_new"),
    "non_square": dict(image_size=[32, 48], patch_size=8, num_labels=3),
}


def make_hf(cls=ViTForImageClassification, **kw):
    torch.manual_seed(0)
    cfg = HFConfig(**{**BASE, **kw})
    model = cls(cfg) if cls is ViTForImageClassification else cls(cfg, add_pooling_layer=kw.pop("_pooler", True))
    return randomize(model)


def hf_logits(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_classifier_dir_exact(name, tmp_path):
    kw = CONFIGS[name]
    ref = make_hf(**kw)
    ref.save_pretrained(tmp_path)
    keys = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "model.safetensors"))
    assert any(".attention.attention.query." in k for k in keys)  # legacy names on disk (transformers 5.23)
    model = vitkit.from_pretrained(tmp_path)
    size = kw["image_size"] if isinstance(kw["image_size"], list) else [kw["image_size"]] * 2
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(ref, x)) <= 1e-5
    assert model.config.norm_eps == kw.get("layer_norm_eps", 1e-12)
    assert model.pretrained_info["format"] == "hf"
    assert model.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]  # HF defaults when no preprocessor json


def test_hf_vitmodel_with_pooler_exact(tmp_path):
    """ViTModel's pooler (dense + tanh on the class token) = vitkit's pre-logits layer."""
    ref = make_hf(ViTModel, image_size=32, patch_size=8)
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    assert model.config.head_hidden_dim == 64 and model.config.head_act == "tanh" and model.config.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).pooler_output) <= 1e-5
        assert max_diff(model.forward_features(x), ref(pixel_values=x).last_hidden_state) <= 1e-5


def test_hf_in_memory_5x_names(tmp_path):
    """A state dict saved straight from memory has transformers 5.x names (layers.N.attention.q_proj)."""
    ref = make_hf(image_size=32, patch_size=8, num_labels=5)
    sd = ref.state_dict()
    assert any(".attention.q_proj." in k for k in sd)
    ref.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(ref, x)) <= 1e-5


def test_hf_labels_and_preprocessor(tmp_path):
    ref = make_hf(image_size=32, patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "emu"})
    ref.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 32, "width": 32},
         "resample": 3}))
    model = vitkit.from_pretrained(tmp_path)
    assert model.labels == ["cat", "dog", "emu"]
    assert model.preprocess_cfg == {"input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                                    "interpolation": "bicubic", "crop_pct": 1.0}
    model.save_pretrained(tmp_path / "vk")
    again = vitkit.load_model(tmp_path / "vk")
    assert again.labels == model.labels and again.preprocess_cfg == model.preprocess_cfg


@pytest.mark.parametrize("with_head", [True, False])
def test_hf_export_roundtrip(with_head, tmp_path):
    model = tiny(dim=64, num_heads=4, num_classes=6 if with_head else 0,
                 head_hidden_dim=None if with_head else 64, norm_eps=1e-12, qkv_bias=with_head)
    model.labels = [f"c{i}" for i in range(6)] if with_head else None
    out = model.export_to("hf", tmp_path / "hf")
    cls = ViTForImageClassification if with_head else ViTModel
    ref = cls.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(ref, x)) <= 1e-5
    if with_head:
        assert ref.config.id2label[5] == "c5"


def test_hf_classifier_with_stray_pooler_and_logging(tmp_path, caplog):
    """A ViTForImageClassification file that also holds pooler weights (from a ViTModel parent):
    transformers ignores them, so does vitkit (noted); the detected format is logged."""
    import logging

    from safetensors.torch import load_file, save_file

    ref = make_hf(image_size=32, patch_size=8, num_labels=3)
    ref.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["vit.pooler.dense.weight"], sd["vit.pooler.dense.bias"] = torch.randn(64, 64), torch.randn(64)
    save_file(sd, tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="vitkit.interop"):
        model = vitkit.from_pretrained(tmp_path)
    assert "loaded hf checkpoint" in caplog.text
    assert model.config.head_hidden_dim is None
    assert any("pooler weights ignored" in n for n in model.pretrained_info["report"]["notes"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(ref, x)) <= 1e-5

"""DeiT / DeiT-III load exactly from timm (``deit_*``, distilled with dist token and two heads averaged,
DeiT-III with layer scale and a table without prefix rows) and Hugging Face
(``DeiTForImageClassificationWithTeacher``, ``DeiTModel``). Oracles: timm, transformers."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import load_saved_timm, max_diff, randomize
from vitkit.errors import CheckpointError
from vitkit.io import save_state_dict

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
HF_CONFIGS = {
    "p16_32": dict(image_size=32, patch_size=16, num_labels=5),
    "p8_32_eps": dict(image_size=32, patch_size=8, num_labels=3, layer_norm_eps=1e-6),
    "p32_64": dict(image_size=64, patch_size=32, num_labels=7),
}


def hf(cls, **kw):
    torch.manual_seed(0)
    return randomize(cls(transformers.DeiTConfig(**{**BASE, **kw})))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_deit_with_teacher_exact(name, tmp_path):
    kw = HF_CONFIGS[name]
    ref = hf(transformers.DeiTForImageClassificationWithTeacher, **kw)
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    s = kw["image_size"]
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).logits) <= 1e-5  # (cls head + dist head) / 2
    assert model.config.dist_token and model.config.num_classes == kw["num_labels"]


def test_hf_deit_model_tokens_and_features(tmp_path):
    ref = hf(transformers.DeiTModel, image_size=32, patch_size=16)
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = ref(pixel_values=x).last_hidden_state
        assert max_diff(model.forward_features(x), hidden) <= 1e-5
        assert max_diff(model(x), (hidden[:, 0] + hidden[:, 1]) / 2) <= 1e-5
    assert any("pooler" in n for n in model.load_report.notes)


def test_hf_deit_classification_without_teacher_is_refused(tmp_path):
    ref = hf(transformers.DeiTForImageClassification, image_size=32, patch_size=16, num_labels=3)
    ref.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="distillation token"):
        vitkit.from_pretrained(tmp_path)


def test_hf_deit_other_size_matches_interpolate_pos_encoding(tmp_path):
    ref = hf(transformers.DeiTForImageClassificationWithTeacher, **HF_CONFIGS["p16_32"])
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path, image_size=(48, 64))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x, interpolate_pos_encoding=True).logits) <= 1e-5


def timm_deit(variant, **kw):
    torch.manual_seed(0)
    return randomize(timm.create_model(variant, pretrained=False, embed_dim=32, depth=2, num_heads=2, **kw))


@pytest.mark.parametrize("variant,kw", [
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, num_classes=5)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=(32, 48), num_classes=5)),
    ("deit_tiny_patch16_224", dict(img_size=32, num_classes=5)),
    ("deit3_small_patch16_224", dict(img_size=48, num_classes=4)),
])
def test_timm_deit_exact(variant, kw, tmp_path):
    ref = timm_deit(variant, **kw)
    model, x = load_saved_timm(ref, kw["img_size"], tmp_path)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
    assert model.config.dist_token == ("distilled" in variant)
    assert model.config.pos_embed_prefix == (not variant.startswith("deit3"))


def test_timm_deit_hub_dir_with_config(tmp_path):
    ref = timm_deit("deit_tiny_distilled_patch16_224", img_size=32, num_classes=5)
    save_state_dict(ref.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "deit_tiny_distilled_patch16_224", "num_classes": 5,
        "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5


def test_hf_deit_in_memory_names(tmp_path):
    """transformers 5 renames DeiT in memory (deit.layers.N.attention.q_proj ...): a state_dict()
    saved as is loads too."""
    ref = hf(transformers.DeiTForImageClassificationWithTeacher, **HF_CONFIGS["p16_32"])
    sd = ref.state_dict()
    assert any(".attention.q_proj." in k for k in sd)
    save_state_dict({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    model = vitkit.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).logits) <= 1e-5

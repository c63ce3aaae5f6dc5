"""`vitkit explain` end to end on tiny saved models: report + PNGs written, default model from the
latest training run, clear errors with exit code 2 for bad input."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli.main import main

FIGS = {"patches", "tokens", "filters", "posemb", "attention", "rollout", "distance", "predictions", "pca", "norms"}


@pytest.fixture(scope="module")
def digits_model_dir(tmp_path_factory):
    """A tiny 1-channel digits-sized model saved as a training run (runs/<name>/best)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runs")
    m = vitkit.create_model(vitkit.ViTConfig(image_size=(16, 24), patch_size=(8, 6), in_channels=1, num_classes=10,
                                             dim=16, depth=2, num_heads=2, num_registers=1, name="tiny-digits"))
    m.labels = [f"digit {i}" for i in range(10)]
    m.save_pretrained(root / "run1" / "best")
    return root


def test_explain_writes_self_contained_report(digits_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["explain", "digits:3", "--runs", str(digits_model_dir), "--out", str(out), "--layers", "0,-1",
               "--heads", "1", "--topk", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "using the most recent training run" in text
    assert "patches" in text and "(8, 48)" in text  # walk-through: 2x4 grid of 8*6*1 = 48 values
    assert "register tokens" in text
    assert len(re.findall(r"^\s+0\.\d{4}  digit \d$", text, flags=re.M)) == 3  # top-3 lines
    html = (out / "report.html").read_text()
    assert {p.stem for p in out.glob("*.png")} == FIGS
    srcs = re.findall(r"<img[^>]*src='([^']+)'", html)
    assert len(srcs) == len(FIGS)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html  # nothing to fetch: opens offline
    for s in srcs:  # every embedded image decodes
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    # the embedded attention figure is the same as the PNG file
    att = re.search(r"alt='attention' src='data:image/png;base64,([^']+)'", html).group(1)
    assert base64.b64decode(att) == (out / "attention.png").read_bytes()
    img = np.asarray(Image.open(out / "patches.png").convert("L"), dtype=float)
    assert img.std() > 10  # not blank


def test_explain_regression_model_without_class_token(tmp_path, capsys):
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=(60, 100), patch_size=20, in_channels=1, num_classes=1,
                                             dim=16, depth=2, num_heads=2, class_token=False, pooling="mean",
                                             pos_embed="sincos1d", task="regression"))
    m.save_pretrained(tmp_path / "m")
    rc = main(["explain", "sample:china.jpg", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "3x5 grid of 20x20 patches = 15 patches" in text
    assert "regression outputs:" in text
    with torch.no_grad():
        x = m.preprocess(Image.fromarray(__import__("sklearn.datasets").datasets.load_sample_image("china.jpg"))
                         .convert("L"))
        y = float(m(x[None])[0, 0])
    assert f"{y:8.4f}" in text  # the printed output is the model's output for the preprocessed image
    assert "mean of patch queries" in (tmp_path / "o" / "report.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["missing.png"], "no such file"),
    (["NOTIMG"], "not a readable image"),
    (["BIG.png", "--max-pixels", "100"], "over the limit"),
    (["digits:1", "--layers", "2"], "layer index 2 is out of range"),
    (["digits:1", "--heads", "0,5"], "head index 5 is out of range"),
    (["digits:1", "--heads", "one"], "comma-separated integers"),
])
def test_bad_input_exit_code_2(argv, message, digits_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTIMG").write_text("this is not an image")
    Image.new("L", (20, 20)).save(tmp_path / "BIG.png")  # 400 pixels
    rc = main(["explain", *argv, "--model", str(digits_model_dir / "run1"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_no_model_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "digits:0"]) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and "vitkit train" in err

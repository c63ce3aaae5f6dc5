"""`vitkit predict`: top-k from the model's own preprocessing, batched, JSON, per-file errors,
oversized images refused, run directories (labels) and regression models."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vitkit
from test_interop_common import tiny
from vitkit.cli.main import main
from vitkit.data.image import load_image


@pytest.fixture
def run_dir(tmp_path):
    """A training-run layout: runs/<stamp>/best/ in vitkit format with labels and preprocessing."""
    model = tiny(num_classes=4)
    model.labels = ["ant", "bee", "cat", "dog"]
    model.preprocess_cfg = {"input_size": [3, 32, 32], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4],
                            "interpolation": "bilinear", "crop_pct": 0.875}
    run = tmp_path / "runs" / "20260101-000000"
    model.save_pretrained(run / "best")
    return model, run


def _images(tmp_path):
    a = tmp_path / "a.png"
    Image.new("RGB", (40, 50), (200, 30, 30)).save(a)
    b = tmp_path / "b.jpg"
    Image.new("RGB", (64, 64), (10, 200, 90)).save(b)
    return [str(a), str(b), "sample:flower.jpg"]


def test_predict_json_matches_manual_forward(run_dir, tmp_path, capsys):
    model, run = run_dir
    files = _images(tmp_path)
    assert main(["predict", "--model", str(run), *files, "--top-k", "3", "--json", "--batch-size", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in doc["results"]] == files
    with torch.no_grad():
        x = torch.stack([model.preprocess(load_image(f)) for f in files])
        probs = model.eval()(x).softmax(-1)
    for r, p in zip(doc["results"], probs):
        top = p.topk(3)
        assert [q["index"] for q in r["predictions"]] == top.indices.tolist()
        assert [q["label"] for q in r["predictions"]] == [model.labels[i] for i in top.indices]
        assert [q["prob"] for q in r["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_predict_text_and_bad_files(run_dir, tmp_path, capsys):
    _, run = run_dir
    good = _images(tmp_path)[0]
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image")
    missing = tmp_path / "missing.png"
    rc = main(["predict", "--model", str(run), str(bad), good, str(missing), "-k", "2"])
    out, err = capsys.readouterr()
    assert rc == 1  # some files failed ...
    assert good in out and " 1. " in out and " 2. " in out  # ... but the good one was still classified
    assert "notes.txt: not a readable image file" in err and "missing.png: no such file" in err


def test_predict_refuses_too_large(run_dir, tmp_path, capsys):
    _, run = run_dir
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    rc = main(["predict", "--model", str(run), str(big), "--max-pixels", "10000"])
    err = capsys.readouterr().err
    # refused with a message naming the file and the limit (whichever of load_image's two guards fires)
    assert rc == 1 and "big.png" in err and "over the limit of 10,000" in err


def test_predict_regression_prints_outputs(tmp_path, capsys):
    model = tiny(num_classes=2, task="regression")
    model.save_pretrained(tmp_path / "reg")
    assert main(["predict", "--model", str(tmp_path / "reg"), "sample:china.jpg", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    with torch.no_grad():
        ref = model(model.preprocess(load_image("sample:china.jpg"))[None])[0]
    assert r["outputs"] == pytest.approx(ref.tolist(), abs=1e-5)


def test_predict_grey_model_with_digits(tmp_path, capsys):
    model = tiny(in_channels=1, image_size=8, patch_size=4, num_classes=10)
    model.save_pretrained(tmp_path / "g")
    assert main(["predict", "--model", str(tmp_path / "g"), "digits:0", "digits:1", "--json", "-b", "1"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert all(len(r["predictions"]) == 5 and r["predictions"][0]["label"].startswith("class_") for r in res)


def test_predict_from_peer_checkpoint_uses_its_preprocessing(tmp_path, capsys):
    """A torchvision checkpoint: ImageNet mean/std + resize/crop 0.875 travel with the weights."""
    tv = pytest.importorskip("torchvision")
    ref = tv.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=1000).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    assert main(["predict", "--model", str(tmp_path / "tv.pth"), "--num-heads", "2", "sample:china.jpg",
                 "--json", "-k", "1"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]["predictions"][0]
    from torchvision.transforms import v2 as T

    tf = T.Compose([T.ToImage(), T.Resize(36, antialias=True), T.CenterCrop(32), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        p = ref(tf(load_image("sample:china.jpg"))[None]).softmax(-1)[0]
    assert r["index"] == int(p.argmax()) and r["prob"] == pytest.approx(float(p.max()), abs=1e-5)
    assert r["label"] == vitkit.interop.labels.imagenet_labels()[r["index"]]


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_predict_dtype_runs_the_predictor(isolated, run_dir, tmp_path, capsys, dtype):
    """--dtype bf16/int8: probabilities close to the fp32 forward (oracle: the model itself);
    the same top-1 on these clearly separated inputs."""
    if dtype == "int8" and isolated():  # static int8 runs OpenVINO (its own process: conftest.isolated)
        return
    from vitkit.infer import bf16_native
    from vitkit.infer.int8 import unavailable

    # int8 falls back to bf16 where that is native, else fp32, on a CPU without int8 units (or with
    # them switched off by VITKIT_CPU_FEATURES_OFF): fp32 gives exactly the model's probabilities
    low_precision = bf16_native() or (dtype == "int8" and not unavailable())
    model, run = run_dir
    files = _images(tmp_path)
    assert main(["predict", "--model", str(run), *files, "--json", "--dtype", dtype, "-k", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        probs = model.eval()(torch.stack([model.preprocess(load_image(f)) for f in files])).softmax(-1)
    for r, p in zip(doc["results"], probs):
        got = torch.zeros(4)
        for q in r["predictions"]:
            got[q["index"]] = q["prob"]
        err = (got - p).abs().max().item()
        assert err < 0.02, err
        if low_precision:
            assert err > 0  # the low-precision path really ran


def test_predict_rejects_an_unknown_dtype(run_dir, capsys):
    _, run = run_dir
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(run), "sample:china.jpg", "--dtype", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_cli_catches_vitkit_errors_only(tmp_path, capsys, monkeypatch):
    """A VitkitError is a clean one-line message (exit 2); any other exception is a bug and
    keeps its traceback (it propagates out of main)."""
    assert main(["predict", "--model", str(tmp_path / "nowhere"), "sample:china.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit predict: error:") and "no such file or directory" in err
    assert "Traceback" not in err

    import vitkit.cli.predict as predict_cli

    def buggy(args):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(predict_cli, "run", buggy)
    with pytest.raises(ValueError, match="internal bug"):
        main(["predict", "sample:china.jpg"])
    monkeypatch.setattr(predict_cli, "run", lambda args: (_ for _ in ()).throw(FileNotFoundError("gone")))
    with pytest.raises(FileNotFoundError):
        main(["predict", "sample:china.jpg"])


def test_explain_dtype_predictions(run_dir, tmp_path, capsys):
    """explain --dtype int8: the predictions printed come from the int8 Predictor (close to the
    fp32 ones the model gives)."""
    model, run = run_dir
    out = tmp_path / "ex"
    assert main(["explain", "sample:flower.jpg", "--model", str(run), "--dtype", "int8", "--topk", "2",
                 "--out", str(out), "--layers", "0", "--filters", "4"]) == 0
    text = capsys.readouterr().out
    lines = text.split("top-2:")[1].strip().splitlines()[:2]
    got = {ln.split()[1]: float(ln.split()[0]) for ln in lines}
    with torch.no_grad():
        p = model.eval()(model.preprocess(load_image("sample:flower.jpg"))[None]).softmax(-1)[0]
    for name, v in got.items():
        assert v == pytest.approx(float(p[model.labels.index(name)]), abs=0.02)

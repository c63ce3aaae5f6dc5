"""vitkit.infer.int8: static int8 for a Predictor (NNCF post-training quantization run by OpenVINO).
A tiny ViT trained on scikit-learn's digits, quantized on 16 of its training images, picks the same
digit as fp32 on the held-out images; the quantized graph is built once per model and calibration;
where the CPU has no int8 units (forced off with VITKIT_CPU_FEATURES_OFF) or the quantizer is not
installed the Predictor says so and runs bf16 (where native) or fp32; calibration that is not real
images of the model's kind is an InputError on every CPU."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from test_infer import _digits_model_and_test_set  # the one trained digits model of the Predictor tests
from vitkit import ViT, ViTConfig
from vitkit.errors import ConfigError, InputError
from vitkit.infer import Predictor, agreement, int8

TINY = dict(image_size=16, patch_size=8, dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10)


def tiny() -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(**TINY)).eval()



@pytest.fixture
def int8_units(monkeypatch):
    """The static path on any CPU with the quantizer installed: the int8 units are asked for by name
    (a CPU without them is the fallback test's case, forced there)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    monkeypatch.setattr("vitkit.infer.int8.cpu.has", lambda flag: flag in int8.UNITS)
    monkeypatch.setattr("vitkit.infer.int8.cpu.is_x86", lambda: True)


@pytest.mark.slow
def test_static_int8_agrees_with_fp32_on_digits_and_is_built_once(isolated, int8_units):
    if isolated():
        return
    torch.manual_seed(0)
    m, x, y = _digits_model_and_test_set()
    with torch.no_grad():
        acc = (m(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.85, f"the test model did not learn digits ({acc:.3f}); agreement would mean little"
    from sklearn.datasets import load_digits

    calib = (torch.tensor(load_digits().images[:16], dtype=torch.float32)[:, None] / 16.0 - 0.5) / 0.5
    p = Predictor(m, "int8", calibration=calib)
    assert p.path == "int8" and p.dtype == "int8" and "NNCF static quantization calibrated on 16" in p.notes[0]
    a = agreement(m, x.split(64), "int8", candidate=p)
    assert a.n == len(y) and a.top1 >= 0.99, str(a)
    assert a.max_abs_diff > 0  # really quantized, not fp32 under another name
    # the same model and calibration: the same quantized graph, nothing rebuilt
    again = Predictor(m, "int8", calibration=calib.clone())
    assert again._int8 is p._int8 and again.notes == p.notes
    # another output is another graph: the pooled features (B, D), close to fp32's
    pooled = Predictor(m, "int8", calibration=calib, output="pooled")
    assert pooled._int8 is not p._int8
    with torch.no_grad():
        want = m.forward_head(m.forward_features(x[:32]), pre_logits=True)
    got = pooled(x[:32])
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.98
    # changed weights: quantized anew
    with torch.no_grad():
        m.head.bias.add_(1.0)
    assert Predictor(m, "int8", calibration=calib)._int8 is not p._int8


@pytest.mark.slow
def test_static_int8_gives_each_image_the_same_output_in_any_batch(isolated, int8_units):
    """Batch invariance (the oracle: the same images one by one), on a mean-pooled model, whose head
    NNCF 3.4 quantized wrongly for batches > 1 (0.33 off at batch 64 on logits of 0.32)."""
    if isolated():
        return
    torch.manual_seed(0)
    m = ViT(ViTConfig(image_size=16, patch_size=4, in_channels=1, dim=32, depth=2, num_heads=4, mlp_dim=64,
                      num_classes=10, pooling="mean")).eval()
    with torch.no_grad():
        for w in m.parameters():
            w.add_(torch.randn_like(w) * 0.05)
    x = torch.randn(64, 1, 16, 16)
    p = Predictor(m, "int8", calibration=x[:16])
    got = p(x)
    torch.testing.assert_close(got, torch.cat([p(r) for r in x.split(1)]), atol=1e-5, rtol=0)
    with torch.no_grad():
        want = m(x)
    assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("off", ["avx512_vnni,amx_int8,avx_vnni", "all"])
def test_without_int8_units_it_says_so_and_falls_back(monkeypatch, off):
    monkeypatch.setenv("VITKIT_CPU_FEATURES_OFF", off)
    monkeypatch.setattr("vitkit.infer.predictor.bf16_native", lambda: off != "all")
    m = tiny()
    p = Predictor(m, "int8", calibration=torch.randn(4, 3, 16, 16))
    want = "fp32" if off == "all" else "bf16"
    assert p.dtype == want and p._int8 is None
    assert "no int8 dot-product units" in p.notes[0] and f"running {want}" in p.notes[0]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
    tol = 1e-5 if want == "fp32" else 3e-2
    assert (p(x) - ref).abs().max() <= tol * ref.abs().max() + 1e-4


def test_without_the_quantizer_it_says_so_and_falls_back(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr("vitkit.infer.int8.importlib.util.find_spec", lambda n: None if n == "nncf" else find(n))
    monkeypatch.setattr("vitkit.infer.int8.cpu.has", lambda flag: flag == "avx512_vnni")
    monkeypatch.setattr("vitkit.infer.int8.cpu.is_x86", lambda: True)
    monkeypatch.setattr("vitkit.infer.predictor.bf16_native", lambda: False)
    p = Predictor(tiny(), "int8", calibration=torch.randn(4, 3, 16, 16))
    assert p.dtype == "fp32" and "nncf is not installed (pip install 'vitkit[int8]')" in p.notes[0]


def test_without_calibration_int8_is_dynamic_and_says_how_to_get_static():
    p = Predictor(tiny(), "int8")
    assert p.path == "engine" and p.dtype == "int8" and p._int8 is None
    assert any("pass calibration=" in n for n in p.notes)


def test_calibration_errors(tmp_path):
    m = tiny()
    with pytest.raises(InputError, match=r"\(N, C, H, W\) float batch .* got a tensor of shape \(3, 16, 16\)"):
        Predictor(m, "int8", calibration=torch.randn(3, 16, 16))
    with pytest.raises(InputError, match="got a tensor of shape .* torch.uint8"):
        Predictor(m, "int8", calibration=torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(InputError, match="have 1 channels, the model takes 3"):
        Predictor(m, "int8", calibration=torch.randn(2, 1, 16, 16))
    with pytest.raises(InputError, match="got an empty sequence"):
        Predictor(m, "int8", calibration=[])
    with pytest.raises(InputError, match="got int"):
        Predictor(m, "int8", calibration=3)
    with pytest.raises(InputError, match="NaN or inf"):
        Predictor(m, "int8", calibration=torch.full((2, 3, 16, 16), float("nan")))
    with pytest.raises(InputError, match="calibration image .*missing.png"):
        Predictor(m, "int8", calibration=[tmp_path / "missing.png"])
    with pytest.raises(ConfigError, match="calibration is for dtype 'int8'"):
        Predictor(m, "bf16", calibration=torch.randn(2, 3, 16, 16))


def test_image_paths_are_preprocessed_as_the_model_takes_them(tmp_path):
    """Paths go through the model's own evaluation transform: (N, C, H, W) at its image size."""
    m = tiny()
    files = []
    for i, size in enumerate([(40, 30), (20, 20)]):
        Image.new("RGB", size, (10 * i, 200, 30)).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_text("not an image")
    x = int8.calibration_batch(files, m)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert int8.load_images([tmp_path / "bad.png", *files], m, limit=1, skip_unreadable=True).shape == (1, 3, 16, 16)


def _run_dir(tmp_path):
    from test_interop_common import tiny as tiny_saved

    model = tiny_saved(num_classes=4)
    model.preprocess_cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                            "interpolation": "bilinear", "crop_pct": 1.0}
    model.save_pretrained(tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 36), (80 * i, 200 - 60 * i, 30)).save(imgs / f"{i}.png")
    return model.eval(), tmp_path / "model", imgs


def _probs(doc) -> torch.Tensor:
    out = torch.zeros(len(doc["results"]), 4)
    for i, r in enumerate(doc["results"]):
        for q in r["predictions"]:
            out[i, q["index"]] = q["prob"]
    return out


def test_predict_calibration_option(tmp_path, capsys, monkeypatch):
    """--calibration belongs to --dtype int8; without int8 units the command still runs (fp32 / bf16)."""
    import json

    from vitkit.cli.main import main

    _, model, imgs = _run_dir(tmp_path)
    assert main(["predict", str(imgs), "--model", str(model), "--calibration", str(imgs)]) == 2
    assert "--calibration is for --dtype int8 (its static quantization); got --dtype fp32" in capsys.readouterr().err
    monkeypatch.setenv("VITKIT_CPU_FEATURES_OFF", "all")
    fp32 = main(["predict", str(imgs), "--model", str(model), "--json"]), json.loads(capsys.readouterr().out)
    i8 = main(["predict", str(imgs), "--model", str(model), "--json", "--dtype", "int8"]), json.loads(capsys.readouterr().out)
    assert fp32[0] == i8[0] == 0
    torch.testing.assert_close(_probs(i8[1]), _probs(fp32[1]), atol=1e-5, rtol=0)  # fell back to fp32


@pytest.mark.slow
def test_predict_int8_calibrates_on_a_folder_and_keeps_stdout_json(isolated, tmp_path, capsys, int8_units):
    if isolated():
        return
    import json

    from vitkit.cli.main import main

    _, model, imgs = _run_dir(tmp_path)
    assert main(["predict", str(imgs), "--model", str(model), "--json"]) == 0
    fp32 = _probs(json.loads(capsys.readouterr().out))
    assert main(["predict", str(imgs), "--model", str(model), "--json", "--dtype", "int8", "--calibration", str(imgs)]) == 0
    i8 = _probs(json.loads(capsys.readouterr().out))  # NNCF's progress bars stay off stdout
    err = (i8 - fp32).abs().max().item()
    assert 0 < err < 0.05, err

"""CLI texts that help: `vitkit models` filters (substring, shell pattern, paper name) and says when
nothing matches; every --help states each default once; --format says target vs source; the image
size refusal names options that exist; regression outputs are printed by their saved names."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli.main import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("pattern,expect", [
    ("small", {"vit_small_patch32_224", "vit_small_patch32_384", "vit_small_patch16_224", "vit_small_patch16_384",
               "vit_small_patch8_224"}),
    ("ViT-B/16", {"vit_base_patch16_224", "vit_base_patch16_384"}),
    ("ViT-L/16@384", {"vit_large_patch16_384"}),
    ("vit-h", {"vit_huge_patch14_224", "vit_huge_patch16_224"}),
    ("vit_base_patch8*", {"vit_base_patch8_224"}),
])
def test_models_filter_by_substring_pattern_or_paper_name(pattern, expect, capsys):
    assert main(["models", pattern, "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == expect


def test_models_says_when_no_preset_matches(capsys):
    assert main(["models", "ViT-X/3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no preset matches 'ViT-X/3'" in err and "ViT-B/16" in err


def test_every_help_states_each_default_once():
    for name, p in _subparsers().items():
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text, name
        for action in p._actions:
            h = p._get_formatter()._expand_help(action) if action.help else ""
            assert h.count("(default:") <= 1, (name, action.dest, h)


def test_format_help_says_target_or_source():
    subs = _subparsers()

    def format_help(cmd: str) -> str:
        a = next(a for a in subs[cmd]._actions if "--format" in a.option_strings)
        return a.help

    assert "WRITE" in format_help("export") and "target" in format_help("export")
    for cmd in ("convert", "predict"):
        assert "READ" in format_help(cmd), cmd


def test_image_size_refusal_names_options_that_exist(tmp_path, monkeypatch):
    from vitkit.data.image import load_image
    from vitkit.errors import InputError

    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(big)
    with pytest.raises(InputError) as e:
        load_image(big, max_pixels=100)
    msg = str(e.value)
    assert "--max-pixels" in msg and "VITKIT_MAX_IMAGE_PIXELS" in msg and "raise max_pixels" not in msg
    # each named option is real: predict / explain have --max-pixels; the environment variable works everywhere
    for cmd in ("predict", "explain"):
        assert any("--max-pixels" in a.option_strings for a in _subparsers()[cmd]._actions)
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(InputError, match="over the limit of 1,000"):
        load_image(big)
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "2000")
    assert load_image(big).size == (40, 40)


def _regression_model(tmp_path):
    model = vitkit.ViT(vitkit.ViTConfig(image_size=16, patch_size=8, num_classes=2, dim=16, depth=1, num_heads=2,
                                        task="regression"))
    model.labels = ["brightness", "contrast"]
    model.pretrained_info = {"task": "regression", "targets": ["brightness", "contrast"]}
    model.save_pretrained(tmp_path / "reg")
    return model


def test_regression_predict_prints_target_names(tmp_path, capsys):
    model = _regression_model(tmp_path)
    assert main(["predict", "--model", str(tmp_path / "reg"), "sample:china.jpg"]) == 0
    out = capsys.readouterr().out
    assert "output 0" not in out and "outputs:" not in out
    from vitkit.data.image import load_image

    with torch.no_grad():
        ref = model.eval()(model.preprocess(load_image("sample:china.jpg"))[None])[0]
    got = dict(re.findall(r"^\s+(brightness|contrast)\s+(\S+)$", out, re.M))
    assert float(got["brightness"]) == pytest.approx(float(ref[0]), abs=1e-4)
    assert float(got["contrast"]) == pytest.approx(float(ref[1]), abs=1e-4)
    assert main(["predict", "--model", str(tmp_path / "reg"), "sample:china.jpg", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["names"] == ["brightness", "contrast"]


def test_regression_explain_names_outputs(tmp_path):
    from vitkit.viz.report import _predictions

    model = _regression_model(tmp_path)
    loaded = vitkit.from_pretrained(tmp_path / "reg")
    preds, regression = _predictions(loaded, torch.tensor([[0.25, -1.0]]), topk=5)
    assert regression and preds == [("brightness", 0.25), ("contrast", -1.0)]
    loaded.labels = None  # names only in pretrained_info (as older runs saved them)
    assert [n for n, _ in _predictions(loaded, torch.zeros(1, 2), 5)[0]] == ["brightness", "contrast"]
    del model


def test_predict_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
    from vitkit.cli.predict import predict_files

    model = _regression_model(tmp_path).eval()
    results = predict_files(model, ["digits:1", "digits:2", "digits:3"], batch_size=1, progress=True)
    err = capsys.readouterr().err
    assert len(results) == 3 and "\r" not in err and "predict: 3/3" in err, err

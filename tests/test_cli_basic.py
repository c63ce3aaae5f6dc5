"""CLI basics: `vitkit models`, `vitkit summary`, --help of every subcommand, exit codes."""

from __future__ import annotations

import argparse
import importlib
import json
import runpy
import sys

import pytest

from vitkit.bench.flops import count_flops, count_params
from vitkit.cli.main import COMMANDS, build_parser, main
from vitkit.config import PRESETS, get_config


def _available():
    out = []
    for name in COMMANDS:
        try:
            importlib.import_module(f"vitkit.cli.{name}")
        except ModuleNotFoundError:
            continue
        out.append(name)
    return out


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    line = next(ln for ln in out.splitlines() if ln.startswith("vit_base_patch16_224 "))
    assert "86,567,656" in line and "35.13" in line and "17.56" in line


def test_models_json_and_filter(capsys):
    assert main(["models", "vit_small*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {n for n in PRESETS if n.startswith("vit_small")}
    for r in rows:
        c = PRESETS[r["name"]]
        assert r["params"] == count_params(c)
        assert r["gmacs"] == round(count_flops(c)["gmacs"], 2)


def _png(path, size=(100, 60), mode="L"):
    from PIL import Image

    Image.new(mode, size, 128).save(path)
    return str(path)


def test_summary_cli(capsys, tmp_path):
    img = _png(tmp_path / "art.png")  # a 100x60 grey picture, as in tutorial 2
    args = ["summary", "vit_tiny_patch16_224", "--image-size", "60", "100", "--patch-size", "20",
            "--in-channels", "1", "--num-classes", "1", "--image", img]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(15, 400)" in out and "(15, 192)" in out and "(16, 192)" in out
    assert f"Walk-through of {img} (100x60 L" in out
    c = get_config("ViT-Ti/16", image_size=(60, 100), patch_size=20, in_channels=1, num_classes=1)
    assert f"Total params: {count_params(c):,}" in out


def test_summary_of_a_saved_model(tmp_path, capsys, tiny_config):
    from vitkit import ViT

    m = ViT(tiny_config())
    m.save_pretrained(tmp_path / "m")
    img = _png(tmp_path / "rgb.png", (40, 30), "RGB")
    assert main(["summary", str(tmp_path / "m"), "--image", img]) == 0
    out = capsys.readouterr().out
    assert f"Total params: {m.num_params():,}" in out and "(16, 48)" in out  # 16 patches of 4*4*3
    # weights that cannot fit the overridden config: a clear error and exit code 2, no traceback
    assert main(["summary", str(tmp_path / "m"), "--num-classes", "9", "--no-walkthrough"]) == 2
    assert "head.weight" in capsys.readouterr().err


def test_unknown_model_exit_code_and_suggestion(capsys):
    assert main(["summary", "vit_bsae_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "unknown model name" in err and "vit_base_patch16_224" in err
    assert main(["summary", "vit_tiny_patch16_224", "--image-size", "1", "2", "3"]) == 2
    assert main(["summary", "vit_tiny_patch16_224", "--image-size", "30"]) == 2  # not divisible by 16
    assert "divisible" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize("name", _available())
def test_every_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: vitkit {name}" in capsys.readouterr().out


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{cmd} {a.dest}" for cmd, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing


def test_python_m_entry_point(monkeypatch, capsys):
    """`python -m vitkit models 'vit_tiny*'`, run in-process (a subprocess would re-import torch)."""
    monkeypatch.setattr(sys, "argv", ["vitkit", "models", "vit_tiny*"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("vitkit", run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and "5,717,416" in out and "vit_base" not in out


def test_summary_image_errors(tmp_path, capsys):
    assert main(["summary", "ViT-Ti/16", "--image-size", "32", "--image", str(tmp_path / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["summary", "ViT-Ti/16", "--image-size", "32", "--image", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_load_image_uses_its_own_pixel_limit(tmp_path, monkeypatch):
    """max_pixels decides, both ways, not Pillow's global decompression-bomb limit."""
    from PIL import Image

    from vitkit.data.image import load_image
    from vitkit.errors import InputError

    img = _png(tmp_path / "a.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for Pillow's 89.5 Mpx default
    assert load_image(img, max_pixels=10_000).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputError, match="1,600 pixels, over the limit of 1,000"):
        load_image(img, max_pixels=1000)


def test_load_image_restores_pillow_limit_under_concurrent_calls(tmp_path, monkeypatch):
    """Threads opening images at once must leave Pillow's global limit as they found it (each
    call swaps it around the header read; unserialized, a thread can save another's None and
    restore that last)."""
    import threading
    import time

    from PIL import Image

    from vitkit.data.image import load_image

    img = _png(tmp_path / "a.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    real_open = Image.open

    def slow_open(*args, **kwargs):  # a slow header read widens the window a race needs
        time.sleep(0.02)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    barrier, sizes = threading.Barrier(4), []

    def worker():
        barrier.wait()
        sizes.append(load_image(img, max_pixels=10_000).size)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sizes == [(40, 40)] * 4
    assert Image.MAX_IMAGE_PIXELS == 1000

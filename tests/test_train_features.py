"""Trainer options and guards: --amp bf16 and --compile on the CPU, --grad-checkpointing, explicit
architecture flags with --pretrained, the token budget, warm-up longer than the run, top-5 with few
classes, the split named as test, `vitkit eval --model RUN` on the run's own data. Tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitkit import ViT, ViTConfig
from vitkit.cli.main import main
from vitkit.io import load_safetensors
from vitkit.train.config import TrainConfig
from vitkit.train.loop import train

TINY = dict(dim=16, depth=1, num_heads=2, subset=64, batch_size=16, progress=False, threads=1, epochs=1,
            max_steps=2, deterministic=True)


pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py


def _quiet(*a, **k):
    pass


def _last(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "last" / "model.safetensors")


def test_amp_bf16_trains_under_cpu_autocast(tmp_path, monkeypatch):
    """--amp bf16 on the CPU: the blocks really run in bfloat16 (hook on a Linear), and two steps land
    close to the float32 run (same seed, same batches)."""
    import vitkit.train.build as build

    dtypes = set()
    real = build.build_model

    def spy(cfg, data, *rest):
        model, cfg = real(cfg, data, *rest)
        model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        return model, cfg

    monkeypatch.setattr("vitkit.train.build.build_model", spy)
    fp32 = train(TrainConfig(out=str(tmp_path / "fp32"), **TINY), log=_quiet)
    assert dtypes == {torch.float32}
    dtypes.clear()
    bf16 = train(TrainConfig(out=str(tmp_path / "bf16"), amp="bf16", **TINY), log=_quiet)
    assert torch.bfloat16 in dtypes
    a, b = _last(tmp_path / "fp32"), _last(tmp_path / "bf16")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # bf16 did change the arithmetic ...
    for k in a:  # ... but not the training: two steps from the same init stay close
        torch.testing.assert_close(b[k], a[k], atol=2e-2, rtol=2e-2, msg=k)
    assert bf16["test_loss"] == pytest.approx(fp32["test_loss"], rel=0.02)


@pytest.mark.slow
def test_compile_trains_the_same_weights_on_cpu(tmp_path):
    """--compile (inductor on the CPU): same weights as eager after two steps, to float rounding."""
    cfg = dict(TINY, drop_path=0.0)
    train(TrainConfig(out=str(tmp_path / "eager"), **cfg), log=_quiet)
    train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **cfg), log=_quiet)
    a, b = _last(tmp_path / "eager"), _last(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_grad_checkpointing_gives_the_same_weights(tmp_path):
    train(TrainConfig(out=str(tmp_path / "plain"), **TINY), log=_quiet)
    train(TrainConfig(out=str(tmp_path / "ckpt"), grad_checkpointing=True, **TINY), log=_quiet)
    a, b = _last(tmp_path / "plain"), _last(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def _pretrained(tmp_path: Path) -> Path:
    from vitkit.io import save_pretrained

    torch.manual_seed(0)
    m = ViT(ViTConfig(image_size=16, patch_size=4, in_channels=1, num_classes=10, dim=32, depth=1, num_heads=2,
                      mlp_dim=64))
    return save_pretrained(m, tmp_path / "pre")


def test_architecture_flags_with_pretrained_are_an_error_naming_them(tmp_path, capsys):
    pre = _pretrained(tmp_path)
    rc = main(["train", "--pretrained", str(pre), "--dim", "64", "--depth", "1", "--patch-size", "8",
               "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--dim 64 (the model has 32)" in err and "--patch-size 8 (the model has 4)" in err
    assert "--depth" not in err  # the model's own value: not a conflict
    assert not (tmp_path / "r").exists()


def test_pretrained_run_records_the_model_it_trained_at_its_input_size(tmp_path, monkeypatch):
    """... and reads the source once (the probe for the input size is the bundle the model loads from)."""
    import vitkit.interop as interop
    from vitkit.io import load_safetensors

    reads = []
    real_read = interop.read_pretrained
    monkeypatch.setattr(interop, "read_pretrained", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    pre = _pretrained(tmp_path)
    run = tmp_path / "ft"
    train(TrainConfig(pretrained=str(pre), out=str(run), **{k: v for k, v in TINY.items()
                                                            if k not in ("dim", "depth", "num_heads")}), log=_quiet)
    assert reads == [(str(pre),)]
    # the run started from those weights: two steps moved them by far less than another init differs
    # (mean |difference| of two seeds' inits here: 0.020)
    start, end = load_safetensors(pre / "model.safetensors"), load_safetensors(run / "last" / "model.safetensors")
    moved = (start["blocks.0.mlp.fc1.weight"] - end["blocks.0.mlp.fc1.weight"]).abs().mean()
    assert 0 < moved < 0.002
    saved = TrainConfig.from_file(run / "config.yaml")
    assert (saved.image_size, saved.patch_size, saved.dim, saved.depth, saved.num_heads, saved.mlp_ratio) == \
        (16, 4, 32, 1, 2, 2.0)  # the pretrained model's, not the from-scratch defaults (8, 2, 32, 4, 4)
    assert saved.out is None  # a recipe never says where to write
    assert json.loads((run / "last" / "config.json").read_text())["config"]["image_size"] in (16, [16, 16])


def test_fresh_head_uses_the_models_truncated_normal_init(tmp_path):
    """The head of a fine-tuning run is drawn by ViT.init_weights: truncated at +-2 std = +-0.04
    (nn.init.trunc_normal_(std=0.02) would truncate at +-2, i.e. nothing)."""
    from vitkit.data.datasets import DataSplits
    from vitkit.train.arch import load_pretrained

    pre = _pretrained(tmp_path)
    fake = DataSplits(name="x", train=None, val=None, test=None, task="classification", num_outputs=1000,
                      in_channels=1, image_hw=(16, 16), classes=None, mean=[0.5], std=[0.5], hflip_ok=False)
    torch.manual_seed(0)
    w = load_pretrained(str(pre), fake).head.weight.detach()
    assert w.abs().max() <= 0.04 + 1e-7
    assert 0.015 < float(w.std()) < 0.02  # a normal truncated at 2 std has std 0.88 * 0.02
    assert (w.abs() > 0.035).any()  # the tails reach close to the bound


def test_auto_patch_and_token_budget_warning():
    from vitkit.train.arch import TOKEN_BUDGET, auto_patch_size, check_tokens

    assert [auto_patch_size((s, s)) for s in (8, 28, 32, 64, 224)] == [2, 2, 2, 4, 16]
    assert (224 // auto_patch_size((224, 224))) ** 2 == 196
    said = []
    m = ViT(ViTConfig(image_size=224, patch_size=2, in_channels=3, num_classes=2, dim=8, depth=1, num_heads=2))
    check_tokens(m, said.append)
    assert m.config.num_tokens >= 112 * 112  # 12,544 patches (+ a class token)
    assert len(said) == 1 and f"{m.config.num_tokens} tokens" in said[0] and str(TOKEN_BUDGET) in said[0]
    assert "--patch-size" in said[0] and "--image-size" in said[0]
    said.clear()
    check_tokens(ViT(ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=2, dim=8, depth=1,
                               num_heads=2)), said.append)
    assert said == []


def test_warmup_longer_than_the_run_warns(tmp_path):
    said = []
    train(TrainConfig(out=str(tmp_path / "r"), warmup_epochs=3, **TINY), log=said.append)
    assert any("warm-up (3 epochs" in s and "--warmup-epochs" in s for s in said)
    said.clear()
    train(TrainConfig(out=str(tmp_path / "r2"), warmup_epochs=0.5, **TINY), log=said.append)
    assert not any("warm-up" in s for s in said)


def _folder(root: Path, with_test: bool) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)) + ((("test", 3),) if with_test else ()):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_eval_of_a_run_uses_its_own_data_and_names_the_split(tmp_path, capsys):
    """Three classes: no top-5 anywhere; only val/: summary.json says the test numbers are on val;
    `vitkit eval --model RUN` reads the run's imagefolder (not digits) and reproduces them."""
    data = _folder(tmp_path / "d", with_test=False)
    run = tmp_path / "run"
    s = train(TrainConfig(dataset="imagefolder", data_dir=str(data), out=str(run), workers=0,
                          **{**TINY, "subset": 0, "batch_size": 6}), log=_quiet)
    assert s["test_split"] == "val" and "test_top5" not in s
    assert "val_top5" not in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--json", "--workers", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["dataset"] == "imagefolder" and ev["count"] == 6 and ev["top5"] is None
    assert ev["accuracy"] == pytest.approx(s["test_accuracy"])
    assert main(["eval", "--model", str(run), "--workers", "0"]) == 0
    assert "top-5" not in capsys.readouterr().out
    with_test = _folder(tmp_path / "d2", with_test=True)
    s = train(TrainConfig(dataset="imagefolder", data_dir=str(with_test), out=str(tmp_path / "run2"), workers=0,
                          **{**TINY, "subset": 0, "batch_size": 6}), log=_quiet)
    assert s["test_split"] == "test"


def test_preset_takes_explicit_overrides_and_the_record_is_the_built_model():
    """--model PRESET with --patch-size / --depth: the preset's other values, the given ones applied
    (README: ViT-S at 32x32 with patch 4); config.yaml records what was built."""
    from vitkit.data import DataSpec, build_data
    from vitkit.train.arch import build_model

    data = build_data(DataSpec(image_size=32))
    model, rec = build_model(TrainConfig(model="vit_tiny_patch16_224", image_size=32, patch_size=4, depth=2), data)
    c = model.config
    assert (c.patch_size, c.depth, c.dim, c.num_heads, c.image_hw) in ((4, 2, 192, 3, (32, 32)),
                                                                         ((4, 4), 2, 192, 3, (32, 32)))
    assert (rec.patch_size, rec.depth, rec.dim, rec.num_heads, rec.mlp_ratio, rec.image_size) == (4, 2, 192, 3, 4.0, 32)


def test_next_steps_name_the_run_and_real_commands():
    """The demo ends by saying what to try next: commands on this run, each a real subcommand."""
    from vitkit.cli.main import COMMANDS
    from vitkit.cli.train import next_steps

    text = next_steps({"run_dir": "runs/r-1", "dataset": "digits"})
    lines = [ln for ln in text.splitlines() if ln.startswith("  vitkit ")]
    assert len(lines) == 4 and text.splitlines()[1] == "next:"
    assert {ln.split()[1] for ln in lines} <= set(COMMANDS)
    assert all("--model runs/r-1" in ln for ln in lines[:3]) and "digits:5" in lines[0]
    assert len({ln.index("#") for ln in lines}) == 1  # comments in one column
    assert "IMAGE.png" in next_steps({"run_dir": "r", "dataset": "imagefolder"})

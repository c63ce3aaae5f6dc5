"""Resume changes nothing it should not (issue 22, section 5), and a short run reports the better of
its raw and EMA weights (section 7): overrides validated before anything is written, architecture /
data / recipe changes refused naming the option, allowed changes recorded in amendments.yaml beside an
untouched config.yaml, --max-steps limiting one invocation (resumed bit-identically), a run without a
training state restarted in place, the EMA horizon scaled to the run. Tiny digits runs (4 steps/epoch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from vitkit.cli.main import main
from vitkit.io import load_safetensors
from vitkit.train.checkpoint import load_state, save_state
from vitkit.train.config import TrainConfig
from vitkit.train.loop import train

TINY = dict(dim=32, depth=1, num_heads=2, subset=64, batch_size=16, epochs=2, progress=False, threads=1,
            deterministic=True, warmup_epochs=1)
TIMING = {"epoch_seconds", "images_per_second"}

pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py


def _quiet(*a, **k):
    pass


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path, sub: str) -> None:
    wa, wb = load_safetensors(a / sub / "model.safetensors"), load_safetensors(b / sub / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub


def _stopped(tmp_path: Path, name: str = "run", steps: int = 3, **kw) -> Path:
    """A run stopped by --max-steps inside its first epoch (its state saved there, as a signal saves it)."""
    run = tmp_path / name
    s = train(TrainConfig(out=str(run), max_steps=steps, **{**TINY, **kw}), log=_quiet)
    assert s["finished"] is False and s["steps"] == steps
    return run


def test_refused_overrides_change_nothing_and_the_run_still_resumes(tmp_path, capsys):
    run = _stopped(tmp_path, steps=5)  # epoch 2, batch 1
    before = _files(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr", "5", "--dim", "128", "--seed", "1", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit train: error: ") and len(err.strip().splitlines()) == 1
    for said in ("--dim 32 -> 128 (it changes the model's shapes", "--seed 0 -> 1", "--batch-size 16 -> 8",
                 "Nothing was changed", "--lr"):
        assert said in err, said
    assert "--lr 0.003 -> 5" not in err  # allowed: not among the refused
    assert main(["train", "--resume", str(run), "--lr", "5", "--epochs", "1"]) == 2
    assert f"--epochs 1: {run} has already trained 1 epoch(s) and 1 step(s)" in capsys.readouterr().err
    assert _files(run) == before  # config.yaml, the state, metrics: byte for byte
    assert not (run / "amendments.yaml").exists()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # the plain resume still works
    assert "resumed" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_resume_options_are_partitioned_and_documented():
    from vitkit.cli.main import build_parser
    from vitkit.train.config import PER_INVOCATION, field_names
    from vitkit.train.resume import RESUME_CHANGEABLE, RESUME_REFUSED

    fields = set(field_names())
    assert set(RESUME_CHANGEABLE) <= fields and set(RESUME_REFUSED) <= fields and set(PER_INVOCATION) <= fields
    assert not (set(RESUME_CHANGEABLE) & set(RESUME_REFUSED)) and not (set(RESUME_CHANGEABLE) & set(PER_INVOCATION))
    for arch in ("dim", "depth", "num_heads", "patch_size", "image_size", "dataset", "num_classes"):
        assert arch in RESUME_REFUSED
    train_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                      if "--resume" in a.option_strings).help
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for k in RESUME_CHANGEABLE:
        flag = "--" + k.replace("_", "-")
        assert flag in train_help and f"`{flag}`" in docs, flag


def test_allowed_changes_are_amendments_beside_the_original_config(tmp_path, capsys):
    from vitkit.train.optim import lr_at
    from vitkit.train.resume import read_run_config

    run = _stopped(tmp_path)
    config = (run / "config.yaml").read_bytes()
    assert "max_steps" not in yaml.safe_load(config)  # one invocation's limit is not the run's record
    assert main(["train", "--resume", str(run), "--lr", "1e-3", "--epochs", "3", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "amended (recorded in amendments.yaml): epochs 2 -> 3, lr 0.003 -> 0.001" in out
    assert (run / "config.yaml").read_bytes() == config
    (a,) = yaml.safe_load((run / "amendments.yaml").read_text())
    assert a["changes"] == {"lr": 0.001, "epochs": 3} and (a["step"], a["epoch"]) == (3, 0) and a["time"]
    eff = read_run_config(run)
    assert (eff["lr"], eff["epochs"], eff["dim"]) == (0.001, 3, 32)
    # the same flags again change nothing (no second amendment); a new value is a second one
    assert main(["train", "--resume", str(run), "--lr", "1e-3", "--max-steps", "1"]) == 0
    assert len(yaml.safe_load((run / "amendments.yaml").read_text())) == 1
    assert main(["train", "--resume", str(run), "--min-lr", "0"]) == 0
    assert [x["changes"] for x in yaml.safe_load((run / "amendments.yaml").read_text())] == [
        {"lr": 0.001, "epochs": 3}, {"min_lr": 0.0}]
    # the effective config trained: the schedule of epochs 2 and 3 is the amended one (lr_at as oracle)
    m = _metrics(run)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    assert m[-1]["lr"] == lr_at(m[-1]["step"] - 1, 12, 4, 1e-3, 0.0)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2  # fewer epochs than trained
    assert "already finished (3 epochs)" in capsys.readouterr().err


def test_max_steps_limits_one_invocation_and_resumes_bit_identically(tmp_path, capsys):
    """4 steps per epoch: stop at step 3 (inside epoch 1), then at step 4 (its end), then to the end:
    the same weights, metrics and test numbers as the uninterrupted run. An older vitkit's state
    (no labels, a --max-steps stop marked finished) resumes too."""
    ref = tmp_path / "ref"
    train(TrainConfig(out=str(ref), **TINY), log=_quiet)
    run = _stopped(tmp_path, steps=3)
    assert (run / "last" / "model.safetensors").is_file()
    state = load_state(run / "train_state.pt")
    assert (state["epoch"], state["step"], state["batch_pos"], state["finished"]) == (0, 3, 3, False)
    assert state["labels"] == [str(i) for i in range(10)]
    (partial,) = _metrics(run)  # the epoch so far, marked; a resume rewrites metrics.jsonl to the state's history
    assert (partial["epoch"], partial["step"], partial["partial"]) == (1, 3, True) and "val_ema_accuracy" in partial
    old = {k: v for k, v in state.items() if k != "labels"}
    save_state(run / "train_state.pt", {**old, "finished": True})  # as an older vitkit wrote it
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "stopped by --max-steps 1 at step 4 of 8 (the end of epoch 1)" in out and "already finished" not in out
    assert json.loads((run / "summary.json").read_text())["finished"] is False
    assert load_state(run / "train_state.pt")["step"] == 4
    assert main(["train", "--resume", str(run)]) == 0
    for sub in ("last", "best"):
        _same_weights(ref, run, sub)
    assert _metrics(run) == _metrics(ref)
    sr, sb = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    assert (sb["test_accuracy"], sb["test_loss"], sb["finished"]) == (sr["test_accuracy"], sr["test_loss"], True)
    assert not (run / "amendments.yaml").exists()  # --max-steps is not a change of the run
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "already finished (2 epochs); nothing to resume" in capsys.readouterr().err


def test_a_run_without_training_state_restarts_in_place(tmp_path, capsys):
    ref = tmp_path / "ref"
    train(TrainConfig(out=str(ref), **TINY), log=_quiet)
    run = tmp_path / "killed"  # killed before its first checkpoint: config.yaml and a stale epoch line
    run.mkdir()
    shutil.copy(ref / "config.yaml", run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 4, "train_loss": 9.0}\n')
    capsys.readouterr()
    assert main(["train", "--out", str(run)]) == 2
    assert f"--resume {run}" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no training state yet" in out and "starting it from the beginning with its recorded config" in out
    for sub in ("last", "best"):
        _same_weights(ref, run, sub)
    assert _metrics(run) == _metrics(ref)
    assert (run / "config.yaml").read_bytes() == (ref / "config.yaml").read_bytes()


def test_short_run_reports_the_better_of_model_and_ema_on_validation(tmp_path, monkeypatch):
    """A lagging EMA (decay 0.999 over 48 steps, the run-length cap lifted) validates worse than the
    model (0.23 against 0.11 here): best/ holds the model's weights and the summary says so; the choice
    is the argmax of the recorded validation numbers."""
    import vitkit.train.ema as ema

    monkeypatch.setattr(ema, "RUN_FRACTION", 1e-6)
    logs: list[str] = []
    run = tmp_path / "run"
    s = train(TrainConfig(out=str(run), **{**TINY, "subset": 256, "epochs": 3, "ema_decay": 0.999, "lr": 1e-2,
                                           "augment": False, "drop_path": 0.0}),
              log=lambda *a: logs.append(" ".join(map(str, a))))
    last = _metrics(run)[-1]
    model, avg = (last["val_accuracy"], -last["val_loss"]), (last["val_ema_accuracy"], -last["val_ema_loss"])
    assert model > avg  # the oracle: the recorded validation numbers
    assert s["best_weights"] == "model" and s["weights_choice"].startswith(
        f"model (val accuracy {last['val_accuracy']:.4f}, loss {last['val_loss']:.4f}) over ema")
    assert any(line.startswith("final weights: model (val accuracy") for line in logs)
    assert any("with the model weights of epoch 3" in line for line in logs)
    best, raw = (load_safetensors(run / sub / "model.safetensors") for sub in ("best", "last"))
    assert all(torch.equal(best[k], raw[k]) for k in raw)  # best/ = the model at the end


@pytest.mark.parametrize("scores, want", [
    ({"model": [0.44, -1.5], "ema": [0.40, -1.6]}, "model"),
    ({"model": [0.40, -1.5], "ema": [0.44, -1.6]}, "ema"),
    ({"model": [0.44, -1.5], "ema": [0.44, -1.4]}, "ema"),  # equal accuracy: the lower loss
    ({"model": [0.44, -1.4], "ema": [0.44, -1.5]}, "model"),
    ({"model": [0.44, -1.5], "ema": [0.44, -1.5]}, "ema"),  # a tie: the EMA, where the schedule ends
    ({}, "ema"),  # no validation split
])
def test_final_choice_rule(monkeypatch, scores, want):
    from types import SimpleNamespace

    import vitkit.train.loop as loop

    saved = []
    monkeypatch.setattr(loop, "save_model", lambda run, st, m, d, which: saved.append((m, which)))
    rec = {f"{'val' if w == 'model' else 'val_ema'}_{k}": (s[0] if k == "accuracy" else -s[1])
           for w, s in scores.items() for k in ("accuracy", "loss")}
    run = SimpleNamespace(data=SimpleNamespace(task="classification"), log=_quiet)
    st = SimpleNamespace(epoch=5, step=50, best=None)
    cands = {"model": "M", "ema": "E"}
    loop.choose_final(run, st, SimpleNamespace(run_dir=Path("r")), cands, scores, rec)
    assert st.best["which"] == want and saved == [(cands[want], want)]
    assert (st.best["choice"] is None) == (len(scores) == 0) or "no validation split" in st.best["choice"]


def test_ema_horizon_scales_with_the_run():
    from vitkit.train.ema import run_decay

    assert run_decay(0.99, 19 * 150) == 0.99  # the default digits run keeps its decay
    assert run_decay(0.99, 190) == pytest.approx(1 - 10 / 190)  # 10 epochs: a 19-step horizon
    for total in (20, 50, 200, 1000, 5000):
        d = run_decay(0.99, total)
        assert d <= 0.99 and 1 / (1 - d) <= max(total / 10, 1) + 1e-9  # at most a tenth of the run
    assert run_decay(0.99, 5) == 0.0 and run_decay(0.99, 0) == 0.99


def test_the_run_uses_and_reports_its_capped_decay(tmp_path):
    """8 steps: decay min(0.99, 1 - 10/8) = 0; the EMA is then the model itself (torch's EMA arithmetic
    with decay 0 as the oracle), and the summary records the decay used."""
    logs: list[str] = []
    run = tmp_path / "run"
    s = train(TrainConfig(out=str(run), **TINY), log=lambda *a: logs.append(" ".join(map(str, a))))
    assert s["ema_decay"] == 0.0
    assert any(line.startswith("ema: decay 0, the EMA follows the model: a run of 8 steps is too short")
               and "--ema-decay 0.99" in line for line in logs)
    state = load_state(run / "train_state.pt")
    ema = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(ema[k], state["model"][k]) for k in state["model"])


def _folder(root: Path, classes: tuple[str, ...]) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_moved_data_must_hold_the_runs_classes(tmp_path, capsys):
    """--data-dir may change on resume (the data moved), but only to data with the run's classes."""
    data = _folder(tmp_path / "data", ("cat", "dog"))
    run = tmp_path / "run"
    train(TrainConfig(dataset="imagefolder", data_dir=str(data), out=str(run), max_steps=1, workers=0, patch_size=4,
                      **{**TINY, "subset": 0, "batch_size": 4}), log=_quiet)
    before = _files(run)
    other = _folder(tmp_path / "other", ("cat", "fox"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "has the classes ['cat', 'fox']; the run was trained on ['cat', 'dog']" in err
    assert _files(run) == before
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert main(["train", "--resume", str(run), "--data-dir", str(moved), "--max-steps", "1"]) == 0
    assert [a["changes"] for a in yaml.safe_load((run / "amendments.yaml").read_text())] == [
        {"data_dir": str(moved)}]
    assert yaml.safe_load((run / "config.yaml").read_text())["data_dir"] == str(data)

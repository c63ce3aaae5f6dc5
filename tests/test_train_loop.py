"""End-to-end training: run dir contents, eval agreement, resume after SIGINT / SIGKILL (bit-exact),
NaN stop, label checks, 2-process DDP == 1 process. Tiny models and subsets keep this fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitkit.cli.main import main
from vitkit.io import load_model, load_safetensors

TINY = ["--dim", "32", "--depth", "1", "--num-heads", "2", "--no-progress", "--deterministic"]
TIMING_KEYS = {"epoch_seconds", "images_per_second"}


@pytest.fixture(autouse=True)
def _restore_torch_state():
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, sub: str = "last") -> dict[str, torch.Tensor]:
    return load_safetensors(run / sub / "model.safetensors")


def test_default_recipe_smoke_writes_a_complete_run(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--epochs", "2", "--subset", "256", "--batch-size", "32", "--out", str(run), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "train_state.pt", "curves.png",
                 "confusion_matrix.png", "best/model.safetensors", "last/config.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "epochs", "wall_seconds", "params"):
        assert key in summary, key
    assert summary["epochs"] == 2 and len(_metrics(run)) == 2
    model = load_model(run)  # best/
    assert model.labels == [str(i) for i in range(10)] and model.config.in_channels == 1
    # the saved preprocessing maps a user's 8-bit PNG of a digit onto the training scale (v/16)
    from sklearn.datasets import load_digits

    from vitkit.data.image import load_image

    pre = model.preprocess_cfg
    x = model.preprocess(load_image("digits:5", mode="L"))
    expect = (torch.from_numpy(load_digits().images[5]).float() / 16 - pre["mean"][0]) / pre["std"][0]
    torch.testing.assert_close(x[0], expect, atol=0.5 / 255 / pre["std"][0] + 1e-6, rtol=0)
    # `vitkit eval` on the run reproduces the test numbers the trainer reported
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--json", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert ev["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert sum(map(sum, ev["confusion_matrix"])) == ev["count"] == 359
    assert (tmp_path / "ev" / "confusion_matrix_eval.png").is_file()
    # fine-tuning from the run: with a vanishing lr the body keeps the pretrained weights exactly
    # (to AdamW's first-step size), the head is re-initialised
    ft = tmp_path / "ft"
    assert main(["train", "--pretrained", str(run), "--epochs", "1", "--subset", "64", "--batch-size", "32",
                 "--lr", "1e-12", "--min-lr", "0", "--layer-decay", "0.75", "--no-ema", "--out", str(ft), *TINY]) == 0
    before, after = _weights(run, "best"), _weights(ft, "last")
    for k in before:
        if not k.startswith("head."):
            torch.testing.assert_close(after[k], before[k], atol=1e-9, rtol=0, msg=k)
    assert not torch.allclose(after["head.weight"], before["head.weight"], atol=1e-3)


def test_labels_and_num_classes_checked_before_training(tmp_path, capsys):
    rc = main(["train", "--num-classes", "5", "--out", str(tmp_path / "r"), *TINY])
    assert rc == 2
    assert "--num-classes 5 disagrees with the data: digits has 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss is read every --log-every steps (no sync per step): the run stops at the next read
    point after the first non-finite loss, names that step, and saves nothing after it."""
    import vitkit.train.loop as loop
    from vitkit.train.checkpoint import load_state
    from vitkit.train.config import TrainConfig

    real = loop.build_data
    calls = {"n": 0}

    def poisoned(spec):
        splits = real(spec)
        read = splits.train.read_batch

        def read_batch(idx):
            calls["n"] += 1
            x, y = read(idx)
            return (x * float("nan") if calls["n"] > 6 else x), y

        splits.train.read_batch = read_batch
        return splits

    monkeypatch.setattr(loop, "build_data", poisoned)
    cfg = TrainConfig(epochs=3, subset=64, batch_size=16, dim=32, depth=1, num_heads=2, progress=False,
                      log_every=100, out=str(tmp_path / "r"))
    with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step 6 \(epoch 2, batch 3\); stopped at step 8"):
        loop.train(cfg, log=lambda *a: None)
    state = load_state(tmp_path / "r" / "train_state.pt")
    assert state["epoch"] == 1 and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitkit", "train", "--epochs", "2", "--subset", "128", "--batch-size", "16",
            "--out", str(run), *TINY, *extra]


def _wait_for_epoch(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no epoch finished in time")


@pytest.mark.slow
def test_interrupted_runs_resume_to_identical_weights_and_metrics(tmp_path, capsys):
    env = {**os.environ, "VITKIT_TEST_STEP_SLEEP": "0.1"}
    runs = {name: tmp_path / name for name in ("ref", "sigint", "sigkill")}
    procs = {name: subprocess.Popen(_cmd(run), env=env if name != "ref" else dict(os.environ),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, run in runs.items()}
    for name, sig in (("sigint", signal.SIGINT), ("sigkill", signal.SIGKILL)):
        _wait_for_epoch(runs[name], procs[name])
        time.sleep(0.25)  # a few steps into epoch 2
        procs[name].send_signal(sig)
    out = {name: p.communicate(timeout=300) for name, p in procs.items()}
    assert procs["ref"].returncode == 0, out["ref"]
    assert procs["sigint"].returncode == 130, out["sigint"]
    assert "--resume" in out["sigint"][1]
    assert procs["sigkill"].returncode == -signal.SIGKILL
    from vitkit.train.checkpoint import load_state

    assert load_state(runs["sigint"] / "train_state.pt")["batch_pos"] > 0  # saved mid-epoch
    for name in ("sigint", "sigkill"):  # resume in-process (saves an interpreter start-up)
        assert main(["train", "--resume", str(runs[name])]) == 0
        assert "resumed" in capsys.readouterr().out
    ref_w = _weights(runs["ref"])
    for name in ("sigint", "sigkill"):
        w = _weights(runs[name])
        assert all(torch.equal(ref_w[k], w[k]) for k in ref_w), name
        assert _metrics(runs[name]) == _metrics(runs["ref"]), name
        s, ref = (json.loads((runs[n] / "summary.json").read_text()) for n in (name, "ref"))
        assert (s["test_accuracy"], s["test_loss"]) == (ref["test_accuracy"], ref["test_loss"])
    # a finished run refuses to resume
    assert main(["train", "--resume", str(runs["ref"])]) == 2
    assert "already finished" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_same_global_batch(tmp_path):
    args = ["--epochs", "2", "--subset", "128", "--batch-size", "32", "--no-augment", "--drop-path", "0", *TINY]
    single = subprocess.run([sys.executable, "-m", "vitkit", "train", "--out", str(tmp_path / "one"), *args],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vitkit", "train", "--out", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world 2" in ddp.stdout
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    ma, mb = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["val_accuracy"] for m in ma] == [m["val_accuracy"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_csv_regression_run_and_eval(tmp_path, capsys):
    from PIL import Image

    rows = ["path,brightness"]
    for i in range(24):
        Image.new("RGB", (12, 12), (i * 10, i * 10, i * 10)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i * 10 / 255:.5f}")
    (tmp_path / "y.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--dataset", "csv", "--data-dir", str(tmp_path / "y.csv"), "--image-size", "8",
                 "--patch-size", "4", "--epochs", "2", "--batch-size", "8", "--loss", "l1", "--out", str(run),
                 *TINY]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["task"] == "regression" and {"test_mae", "test_rmse", "test_r2"} <= s.keys()
    m = _metrics(run)
    assert len(m) == 2 and "val_r2" in m[0] and "val_accuracy" not in m[0]
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--dataset", "csv", "--data-dir", str(tmp_path / "y.csv"),
                 "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["mae"] == pytest.approx(s["test_mae"], rel=1e-5) and ev["count"] == 2

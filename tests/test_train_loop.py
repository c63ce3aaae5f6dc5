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
from vitkit.interop import load_model
from vitkit.io import load_safetensors

TINY = ["--dim", "32", "--depth", "1", "--num-heads", "2", "--no-progress", "--deterministic"]
TIMING_KEYS = {"epoch_seconds", "images_per_second"}


pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py


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
    # the saved preprocessing maps a user's 8-bit PNG of a digit onto what training saw: the
    # 8x8 digit scaled by v/16 and upsampled to 16x16 (bilinear); within the PNG's 8-bit rounding
    # and the uint8 resize's (0.5/255 each)
    from sklearn.datasets import load_digits

    from vitkit.data.image import load_image

    pre = model.preprocess_cfg
    assert tuple(pre["input_size"]) == (1, 16, 16) and model.config.patch_size in (4, (4, 4))
    x = model.preprocess(load_image("digits:5", mode="L"))
    digit = torch.from_numpy(load_digits().images[5]).float()[None, None] / 16
    seen = torch.nn.functional.interpolate(digit, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    expect = (seen[0, 0] - pre["mean"][0]) / pre["std"][0]
    torch.testing.assert_close(x[0], expect, atol=1.0 / 255 / pre["std"][0] + 1e-6, rtol=0)
    # `vitkit eval` on the run reproduces the test numbers the trainer reported
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--json", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert ev["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert sum(map(sum, ev["confusion_matrix"])) == ev["count"] == 359
    assert (tmp_path / "ev" / "confusion_matrix_eval.png").is_file()
    # --dtype: the same split through vitkit.infer.Predictor's bf16 / int8 paths, close to fp32
    for dtype in ("bf16", "int8"):
        assert main(["eval", "--model", str(run), "--json", "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        low = json.loads(capsys.readouterr().out)
        assert low["dtype"] == dtype and low["count"] == 359
        assert low["accuracy"] == pytest.approx(ev["accuracy"], abs=0.03)
        assert low["loss"] == pytest.approx(ev["loss"], rel=0.1)
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
    import vitkit.train.build as build
    import vitkit.train.loop as loop
    from vitkit.train.checkpoint import load_state
    from vitkit.train.config import TrainConfig

    real = build.build_data
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

    monkeypatch.setattr(build, "build_data", poisoned)
    cfg = TrainConfig(epochs=3, subset=64, batch_size=16, dim=32, depth=1, num_heads=2, progress=False,
                      log_every=100, out=str(tmp_path / "r"))
    with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step 6 \(epoch 2, batch 3\); stopped at step 8"):
        loop.train(cfg, log=lambda *a: None)
    state = load_state(tmp_path / "r" / "train_state.pt")
    assert state["epoch"] == 1 and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 2,
                  size: int = 8) -> Path:
    """A tiny imagefolder of random RGB PNGs (decoded by the loader's workers)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a learnable class signal
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def _folder_cfg(data: Path, out: Path, **kw):
    from vitkit.train.config import TrainConfig

    # 24 train images, batch 8: 3 steps per epoch; per-sample RandomResizedCrop in 2 workers and
    # device-side affine + flips: every random stream of the data path is exercised
    base = dict(dataset="imagefolder", data_dir=str(data), epochs=3, batch_size=8, workers=2, dim=16, depth=1,
                num_heads=2, patch_size=4, random_resized_crop=True, affine_degrees=10.0, warmup_epochs=1, deterministic=True,
                progress=False, threads=1, out=str(out))
    return TrainConfig(**{**base, **kw})


def _same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert _metrics(a) == _metrics(b)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert (sa["test_accuracy"], sa["test_loss"]) == (sb["test_accuracy"], sb["test_loss"])


def _kill_at(step: int, sig: int):
    def on_step(st):
        if st.step == step:
            os.kill(os.getpid(), sig)

    return on_step


@pytest.mark.slow
def test_interrupted_runs_resume_to_identical_weights_with_workers_and_files(tmp_path, capsys):
    """SIGTERM (state saved mid-epoch, loader position included) and SIGKILL (last epoch-end state)
    in the middle of epoch 2, then --resume: bit-identical to the uninterrupted run."""
    from vitkit.train.checkpoint import load_state
    from vitkit.train.loop import TrainingInterrupted, train

    data = _image_folder(tmp_path / "data")
    train(_folder_cfg(data, tmp_path / "ref"), log=lambda *a: None)
    term = tmp_path / "sigterm"
    with pytest.raises(TrainingInterrupted, match="--resume") as e:
        train(_folder_cfg(data, term), log=lambda *a: None, on_step=_kill_at(5, signal.SIGTERM))
    assert e.value.signum == signal.SIGTERM
    saved = load_state(term / "train_state.pt")
    assert (saved["epoch"], saved["step"], saved["batch_pos"]) == (1, 5, 2)  # mid-epoch, no step lost
    assert saved["loader"]["batches"] == 2
    kill = tmp_path / "sigkill"
    code = ("import os, signal, sys\n"
            "from vitkit.train.loop import train\n"
            "from vitkit.train.config import TrainConfig\n"
            f"cfg = TrainConfig.from_file({str(tmp_path / 'k.yaml')!r}, out={str(kill)!r})\n"
            "train(cfg, on_step=lambda st: st.step == 5 and os.kill(os.getpid(), signal.SIGKILL))\n")
    _folder_cfg(data, kill).replace(out=None).save(tmp_path / "k.yaml")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert load_state(kill / "train_state.pt")["step"] == 3  # the end of epoch 1
    for run in (term, kill):
        assert main(["train", "--resume", str(run)]) == 0
        assert "resumed" in capsys.readouterr().out
        _same_run(tmp_path / "ref", run)
    assert main(["train", "--resume", str(tmp_path / "ref")]) == 2  # a finished run refuses to resume
    assert "already finished" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # torchdata's __del__ re-reports it
def test_a_dead_worker_leaves_the_last_checkpoint_resumable(tmp_path):
    import multiprocessing

    from vitkit.train.checkpoint import load_state
    from vitkit.train.loop import train

    data = _image_folder(tmp_path / "data")
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(_folder_cfg(data, ref), log=lambda *a: None)

    def kill_workers(st):
        if st.step == 4:  # one worker of the training loader: the oldest child (the eval loader's start later)
            victim = min(multiprocessing.active_children(), key=lambda c: c.pid)
            os.kill(victim.pid, signal.SIGKILL)
            time.sleep(0.5)  # let the loader notice

    from vitkit.data import DataWorkerError

    with pytest.raises(DataWorkerError, match="--resume"):
        train(_folder_cfg(data, run), log=lambda *a: None, on_step=kill_workers)
    assert load_state(run / "train_state.pt")["step"] == 3  # intact: the end of epoch 1
    train(_folder_cfg(data, run), resume=run, log=lambda *a: None)
    _same_run(ref, run)


_DRIVER = """
import os, signal, sys
from vitkit.train.config import TrainConfig
from vitkit.train.loop import TrainingInterrupted, train
cfg = TrainConfig.from_file(sys.argv[1], out=sys.argv[2])
stop_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
def on_step(st):  # the signal reaches rank 1 only: rank 0 learns it from the collective check
    if st.step == stop_at and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGTERM)
try:
    train(cfg, resume=sys.argv[2] if stop_at < 0 else None, on_step=on_step if stop_at > 0 else None)
except TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
"""


def _torchrun(tmp_path: Path, recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), str(recipe), str(out), *extra], capture_output=True, text=True, timeout=300)


def _close(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5, msg=k)
    ma, mb = _metrics(a), _metrics(b)
    assert [m["val_accuracy"] for m in ma] == [m["val_accuracy"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)


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
    _close(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_ddp_and_fsdp_with_file_data_and_workers_match_one_process_and_fsdp_resumes(tmp_path):
    """imagefolder, 1 worker per rank, per-sample crops + device affine/flips: 2 DDP processes == 1
    process; 2 FSDP (fully_shard, gloo) processes == 1 process; an FSDP run stopped by SIGTERM on one
    rank stops within --log-every steps on both, and resumes to the same weights."""
    from vitkit.train.checkpoint import load_state
    from vitkit.train.loop import train

    data = _image_folder(tmp_path / "data")
    cfg = _folder_cfg(data, tmp_path / "one", workers=1, ema=False, drop_path=0.0, log_every=2)
    recipe = tmp_path / "recipe.yaml"
    cfg.replace(out=None).save(recipe)
    train(cfg, log=lambda *a: None)
    ddp = _torchrun(tmp_path, recipe, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _close(tmp_path / "one", tmp_path / "ddp")
    cfg.replace(out=None, strategy="fsdp").save(recipe)
    fsdp = tmp_path / "fsdp"
    stopped = _torchrun(tmp_path, recipe, fsdp, "4")  # SIGTERM on rank 1 after step 4 (mid-epoch 2)
    assert stopped.returncode != 0 and "interrupted by signal 15" in stopped.stderr, stopped.stderr[-3000:]
    saved = load_state(fsdp / "train_state.pt")
    assert saved["step"] in (4, 5) and saved["batch_pos"] > 0  # read points every 2 steps: step 4 is one
    resumed = _torchrun(tmp_path, recipe, fsdp, "-1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _close(tmp_path / "one", fsdp)


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


def test_training_steps_read_nothing_on_the_host_between_read_points(tmp_path, monkeypatch):
    """No host sync per step: between the loop's read points (every --log-every steps) a step reads
    no tensor value on the host (``.item()``, ``bool(t)``; each a sync on a GPU). Counted with a
    dispatch mode over steps 2-7 of a run with EMA, device affine + flips, label smoothing, grad
    clipping and MixUp on. MixUp's label mixing reads its labels (torchvision's one_hot checks their
    range), so it must be handed the loader's host labels, never the device copy: checked here, and
    its own reads left out of the count. (Host-to-GPU copies from unpinned memory, the other kind
    of sync, cannot be seen on the CPU; the step makes them through ``host_to_device``.)"""
    import traceback

    from vitkit.train import build, loop
    from vitkit.train.config import TrainConfig

    class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads, self.active = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads.append("".join(traceback.format_stack(limit=8)[:-1]))
            return func(*args, **(kwargs or {}))

    mode = HostReads()
    labels_seen = []
    real_mix = build.mix_transform

    def spying_mix(cfg, n):
        mixer = real_mix(cfg, n)

        def mix(x, y):
            labels_seen.append(y)
            if not mode.active:
                return mixer(x, y)
            mode.__exit__(None, None, None)
            try:
                return mixer(x, y)
            finally:
                mode.__enter__()
        return mix

    monkeypatch.setattr(build, "mix_transform", spying_mix)
    batches = []

    def on_step(st):
        if st.step == 2:
            mode.__enter__()
            mode.active = True
        elif st.step == 7:
            mode.__exit__(None, None, None)
            mode.active = False

    real_step = loop.train_step

    def step(run, st, x, y):
        batches.append(y)
        return real_step(run, st, x, y)

    monkeypatch.setattr(loop, "train_step", step)
    real_copy = loop.host_to_device
    # a device copy is another tensor (on the CPU ``.to`` returns the same object): a clone stands in
    monkeypatch.setattr(loop, "host_to_device", lambda t, device: real_copy(t, device).clone())
    cfg = TrainConfig(epochs=1, subset=128, batch_size=16, dim=16, depth=1, num_heads=2, progress=False,
                      log_every=100, ema=True, mixup=0.2, label_smoothing=0.1, grad_clip=1.0, threads=1,
                      out=str(tmp_path / "r"))
    loop.train(cfg, log=lambda *a: None, on_step=on_step)
    assert not mode.reads, "host reads inside training steps:\n" + "\n---\n".join(mode.reads[:3])
    assert len(labels_seen) == len(batches) >= 7
    assert all(a is b for a, b in zip(labels_seen, batches))  # the loader's labels, not a device copy

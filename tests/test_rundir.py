"""A run directory belongs to one run: recipes never carry `out`, a second writer fails at once,
an existing run is refused unless --overwrite, default names are unique within a second, and a
lock left by a killed process does not block."""

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
import yaml

from vitkit.cli.main import main
from vitkit.train.rundir import LOCK_NAME, RunDirBusy, claim_run_dir, new_run_name

TINY = ["--dim", "16", "--depth", "1", "--num-heads", "2", "--no-progress", "--epochs", "1", "--subset", "32",
        "--batch-size", "16", "--no-ema", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _fake_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("epochs: 1\n")
    (path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (path / "eval.json").write_text("{}\n")
    return path


def test_saved_recipe_reused_writes_a_new_run_not_the_old_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old"
    assert main(["train", "--out", str(old), *TINY]) == 0
    saved = yaml.safe_load((old / "config.yaml").read_text())
    assert "out" not in saved and "overwrite" not in saved
    before = (old / "best" / "model.safetensors").read_bytes()
    metrics_before = (old / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--config", str(old / "config.yaml"), "--seed", "1"]) == 0
    assert (old / "best" / "model.safetensors").read_bytes() == before
    assert (old / "metrics.jsonl").read_text() == metrics_before
    new = [p for p in (tmp_path / "runs").iterdir()]
    assert len(new) == 1 and (new[0] / "summary.json").is_file()
    # a recipe written by hand (or by an older vitkit) that names `out` is not obeyed either
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**saved, "out": str(old), "overwrite": True}))
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 0
    assert "recipe.yaml sets out, overwrite: ignored" in capsys.readouterr().err
    assert (old / "best" / "model.safetensors").read_bytes() == before
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_out_existing_run_is_refused_naming_resume_and_out(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["train", "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--resume {run}" in err and "--out" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n' and (run / "eval.json").is_file()


def test_overwrite_clears_a_run_first_but_never_a_foreign_directory(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["train", "--out", str(run), "--overwrite", *TINY]) == 0
    assert not (run / "eval.json").exists()  # the stale file of the old run is gone
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--out", str(foreign), *extra, *TINY]) == 2
        assert "not a vitkit run directory" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "precious" and sorted(os.listdir(foreign)) == ["thesis.tex"]


def test_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with claim_run_dir(run) as d:
        assert d == run
        (run / "config.yaml").write_text("epochs: 1\n")  # the first run has started writing
        t0 = time.monotonic()
        for argv in (["train", "--out", str(run), *TINY], ["train", "--out", str(run), "--overwrite", *TINY],
                     ["train", "--resume", str(run)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert "in use by another vitkit process (vitkit train, " in err and f"pid {os.getpid()}" in err, err
        assert time.monotonic() - t0 < 60  # a blocking lock would hang; a loaded machine is slow
        with pytest.raises(RunDirBusy):
            with claim_run_dir(run, resume=True):
                pass
    assert (run / "config.yaml").read_text() == "epochs: 1\n"
    with claim_run_dir(run, resume=True):  # released at the end of the first run
        pass


def test_default_names_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    names = {new_run_name(tmp_path / "runs") for _ in range(50)}
    assert len(names) == 50 and all(p.is_dir() and p.name.startswith("20260101-000000-") for p in names)
    # two processes started in the same second
    code = ("import time; time.strftime = lambda fmt, *a: '20260101-000000'\n"
            f"from vitkit.train.rundir import new_run_name; print(new_run_name({str(tmp_path / 'p')!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs[0] != outs[1] and all(Path(o).is_dir() for o in outs)


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    run = _fake_run(tmp_path / "run")
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom vitkit.train.rundir import claim_run_dir\n"
            f"with claim_run_dir(Path({str(run)!r}), resume=True):\n"
            "    print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == -signal.SIGKILL and "locked" in p.stdout
    assert "pid" in (run / LOCK_NAME).read_text()  # the stale lock file is still there
    with claim_run_dir(run, resume=True) as d:
        assert f"pid {os.getpid()}" in (d / LOCK_NAME).read_text()


def test_resume_with_overwrite_is_refused(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
    assert (run / "eval.json").is_file()


def test_resume_needs_a_run_and_failed_start_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="no vitkit run there"):
        with claim_run_dir(tmp_path / "nothing", resume=True):
            pass
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(RuntimeError):
        with claim_run_dir(tmp_path / "new"):
            raise RuntimeError("data failed to load")
    assert not (tmp_path / "new").exists()

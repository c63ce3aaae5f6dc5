"""One writer for every command (vitkit.output): for train, convert, export, embed, eval and explain
a user's file in the target survives, a symlink in the target is not followed, and output equal to
(or inside) an input is refused; --overwrite removes only what vitkit wrote; commands that append
take the run lock; stale temporaries of vitkit's own are cleaned; "the most recent run" is the one
that trained last, and the command says which."""

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

import vitkit
from vitkit.cli.main import main
from vitkit.io import TEMP_PATTERN, atomic_write_text, latest_run
from vitkit.output import LOCK_NAME, MANIFEST_NAME, OutputBusy, OutputError, claim_output
from vitkit.train.rundir import claim_run_dir

TINY = ["--dim", "16", "--depth", "1", "--num-heads", "2", "--no-progress", "--epochs", "1", "--subset", "32",
        "--batch-size", "16", "--no-ema", "--threads", "1"]
PRECIOUS = "my thesis, three years of work\n"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _model(path: Path, in_channels: int = 3, num_classes: int = 3) -> Path:
    torch.manual_seed(0)
    vitkit.ViT(vitkit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2, num_classes=num_classes,
                                in_channels=in_channels)).save_pretrained(path)
    return path


def _thesis(tmp_path: Path) -> Path:
    t = tmp_path / "home" / "thesis.txt"
    t.parent.mkdir(exist_ok=True)
    t.write_text(PRECIOUS)
    return t


def _refused(argv, capsys, *words) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"vitkit {argv[0]}: error:" in err and "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


# ---------------------------------------------------------------------------------------- train
def test_train_overwrite_removes_only_what_vitkit_wrote(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    assert main(["train", "--out", str(run), *TINY]) == 0
    (run / "notes.txt").write_text("why run a worked\n")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.csv").write_text("epoch,acc\n1,0.5\n")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--overwrite", *TINY]) == 0
    err = capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "why run a worked\n"
    assert (run / "analysis" / "plot.csv").read_text() == "epoch,acc\n1,0.5\n"
    assert "kept 2 file(s) it did not write: analysis/plot.csv, notes.txt" in err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the old run's epochs are gone
    assert (run / "best" / "model.safetensors").is_file() and not (run / LOCK_NAME).exists()
    assert "best/model.safetensors" in json.loads((run / MANIFEST_NAME).read_text())["files"]


def test_train_lock_never_written_through_a_symlink(tmp_path, capsys):
    thesis = _thesis(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "train_state.pt").write_bytes(b"")
    (run / LOCK_NAME).symlink_to(thesis)
    main(["train", "--resume", str(run)])
    assert thesis.read_text() == PRECIOUS
    assert f"{run / LOCK_NAME} is a symbolic link" in capsys.readouterr().err
    only_link = tmp_path / "fresh"
    only_link.mkdir()
    (only_link / LOCK_NAME).symlink_to(thesis)
    _refused(["train", "--out", str(only_link), *TINY], capsys, "symbolic link")
    # a hard link is no better: the lock is a plain file of vitkit's own
    os.unlink(only_link / LOCK_NAME)
    os.link(thesis, only_link / LOCK_NAME)
    _refused(["train", "--out", str(only_link), *TINY], capsys, "not vitkit's lock file")
    # the run directory itself a link to the user's folder
    (tmp_path / "runlink").symlink_to(thesis.parent, target_is_directory=True)
    _refused(["train", "--out", str(tmp_path / "runlink"), *TINY], capsys, "symbolic link")
    assert thesis.read_text() == PRECIOUS and sorted(os.listdir(thesis.parent)) == ["thesis.txt"]


def test_train_out_inside_its_data_is_refused(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(data / split / c / f"{i}.png")
    before = sorted(str(p) for p in data.rglob("*"))
    for out in (data / "runs" / "x", data):
        _refused(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out), "--overwrite",
                  *TINY], capsys, "never writes onto what it reads")
    assert sorted(str(p) for p in data.rglob("*")) == before


def test_stale_temporaries_cleaned_only_when_no_one_holds_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    # a process killed inside atomic_write leaves its temporary behind
    code = ("import os, signal\nfrom vitkit.io import atomic_write\n"
            f"atomic_write({str(run / 'train_state.pt')!r}, "
            "lambda tmp: (open(tmp, 'wb').write(b'x' * 1000), os.kill(os.getpid(), signal.SIGKILL)))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == -signal.SIGKILL
    stale = [n for n in os.listdir(run) if n.endswith(".tmp")]
    assert len(stale) == 1 and TEMP_PATTERN.match(stale[0]).group("name") == "train_state.pt"
    (run / ".notes.tmp").write_text("mine")  # the user's, not vitkit's pattern
    with claim_run_dir(run, resume=True):
        with pytest.raises(OutputBusy):  # a second claimant cleans nothing while the first lives
            with claim_run_dir(run, resume=True):
                pass
    assert sorted(n for n in os.listdir(run) if n.endswith(".tmp")) == [".notes.tmp"]


def test_a_write_inside_a_claim_never_replaces_a_users_file(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with claim_output(out, command="test", update=True) as claimed:
        (out / "theirs.json").write_text("{}")
        with pytest.raises(OutputError, match="not written by vitkit"):
            atomic_write_text(out / "theirs.json", "[]")
        atomic_write_text(out / "ours.json", "[]")
        atomic_write_text(out / "ours.json", "[1]")  # its own file: replaced
        (tmp_path / "elsewhere").mkdir()
        (out / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        with pytest.raises(OutputError, match="symbolic link"):
            claimed.file("sub/x.png")
    assert (out / "theirs.json").read_text() == "{}" and os.listdir(tmp_path / "elsewhere") == []
    assert json.loads((out / MANIFEST_NAME).read_text())["files"] == ["ours.json"]


# -------------------------------------------------------------------------------------- convert
def test_convert_never_onto_its_source_nor_over_user_files(tmp_path, capsys):
    src = _model(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    _refused(["convert", str(src), str(src), "--image-size", "32"], capsys, "is the input")
    _refused(["convert", str(src), str(src / "sub"), "--image-size", "32"], capsys, "is inside the input")
    _refused(["convert", str(src), str(tmp_path), "--overwrite"], capsys, "contains the input")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text(PRECIOUS)
    _refused(["convert", str(src), str(victim)], capsys, "not empty")
    _refused(["convert", str(src), str(victim), "--overwrite"], capsys, "vitkit wrote nothing there")
    assert (victim / "config.json").read_text() == PRECIOUS
    (tmp_path / "link").symlink_to(victim, target_is_directory=True)
    _refused(["convert", str(src), str(tmp_path / "link")], capsys, "symbolic link")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 0
    (out / "README.md").write_text("my notes")
    _refused(["convert", str(src), str(out), "--image-size", "32"], capsys, "--overwrite")
    capsys.readouterr()
    assert main(["convert", str(src), str(out), "--image-size", "32", "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "my notes" and "kept 1 file(s)" in capsys.readouterr().err
    assert vitkit.load_model(out).config.image_size == 32


# --------------------------------------------------------------------------------------- export
def test_export_never_replaces_user_files(tmp_path, capsys):
    m = _model(tmp_path / "m")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text(PRECIOUS)
    _refused(["export", str(m), "--format", "onnx", "--out", str(victim / "notes.txt")], capsys,
             "already exists", "--overwrite")
    (tmp_path / "x.onnx").symlink_to(victim / "notes.txt")
    _refused(["export", str(m), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--overwrite"], capsys,
             "symbolic link")
    assert (victim / "notes.txt").read_text() == PRECIOUS
    victim2 = tmp_path / "victim2"
    victim2.mkdir()
    (victim2 / "config.json").write_text(PRECIOUS)
    for extra in ([], ["--overwrite"]):
        _refused(["export", str(m), "--format", "timm", "--out", str(victim2), *extra], capsys, str(victim2))
    assert (victim2 / "config.json").read_text() == PRECIOUS
    for fmt, out in (("timm", m), ("torchvision", m / "model.safetensors")):
        _refused(["export", str(m), "--format", fmt, "--out", str(out), "--overwrite"], capsys, "the input")
    # a file target vitkit may replace when asked
    (victim / "old.safetensors").write_text("stale")
    assert main(["export", str(m), "--format", "torchvision", "--out", str(victim / "old.safetensors"),
                 "--overwrite"]) == 0
    assert (victim / "old.safetensors").stat().st_size > 100 and not (victim / ".old.safetensors.vitkit.lock").exists()


# ---------------------------------------------------------------------------------------- embed
@pytest.fixture
def images(tmp_path):
    from features_helpers import write_digits

    write_digits(tmp_path / "imgs", per_class=1, classes=3)
    return tmp_path / "imgs"


def test_a_second_embed_into_one_table_fails_at_once(tmp_path, images, capsys):
    m = _model(tmp_path / "m")
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(images), "--model", str(m), "--out", str(out), "--workers", "0"]
    with claim_output(out, command="embed", kind="file", update=True):  # the first embed, still running
        err = _refused(argv, capsys, "in use by another vitkit process (vitkit embed, ", f"pid {os.getpid()}")
        assert not out.exists() and not out.with_name("emb.parquet.parts").exists(), err
    assert main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["emb.parquet", "imgs", "m"]  # no lock file, no parts left


def test_embed_never_through_a_symlink_nor_inside_its_input(tmp_path, images, capsys):
    m = _model(tmp_path / "m")
    thesis = _thesis(tmp_path)
    (tmp_path / "emb.parquet").symlink_to(thesis)
    base = ["--model", str(m), "--workers", "0"]
    _refused(["embed", str(images), "--out", str(tmp_path / "emb.parquet"), "--overwrite", *base], capsys,
             "symbolic link")
    (tmp_path / "t.parquet.parts").symlink_to(thesis.parent, target_is_directory=True)
    _refused(["embed", str(images), "--out", str(tmp_path / "t.parquet"), *base], capsys, "symbolic link")
    assert thesis.read_text() == PRECIOUS and os.listdir(thesis.parent) == ["thesis.txt"]
    _refused(["embed", str(images), "--out", str(images / "emb.parquet"), *base], capsys, "is inside the input")
    _refused(["embed", str(images), "--out", str(images), *base], capsys, "the input")
    # a killed embed's temporary is cleaned; a user's file of another name is not
    (tmp_path / ".u.parquet.vitkit-abcd1234.tmp").write_bytes(b"x" * 100)
    (tmp_path / ".u.parquet.mine.tmp").write_text("mine")
    assert main(["embed", str(images), "--out", str(tmp_path / "u.parquet"), *base]) == 0
    assert not (tmp_path / ".u.parquet.vitkit-abcd1234.tmp").exists() and (tmp_path / ".u.parquet.mine.tmp").exists()


# ----------------------------------------------------------------------------------------- eval
def test_eval_never_writes_into_a_run_that_is_training(tmp_path, capsys):
    run = tmp_path / "run"
    with claim_run_dir(run):  # a training run, alive
        _model(run / "best", in_channels=1, num_classes=10)
        (run / "config.yaml").write_text("dataset: digits\n")
        _refused(["eval", "--model", str(run), "--workers", "0"], capsys,
                 "in use by another vitkit process (vitkit train, ", "--out")
        assert not (run / "eval.json").exists()
        assert main(["eval", "--model", str(run), "--workers", "0", "--out", str(tmp_path / "ev")]) == 0
        assert (tmp_path / "ev" / "eval.json").is_file()
    assert main(["eval", "--model", str(run), "--workers", "0"]) == 0  # finished: into the run, as before
    assert (run / "eval.json").is_file() and (run / "confusion_matrix_eval.png").is_file()


def test_eval_never_over_user_files_through_links_or_onto_its_model(tmp_path, capsys):
    m = _model(tmp_path / "m", in_channels=1, num_classes=10)
    base = ["--model", str(m), "--dataset", "digits", "--workers", "0"]
    out = tmp_path / "out"
    out.mkdir()
    thesis = _thesis(tmp_path)
    (out / "confusion_matrix_eval.png").symlink_to(thesis)
    _refused(["eval", *base, "--out", str(out)], capsys, "not written by vitkit")
    os.unlink(out / "confusion_matrix_eval.png")
    (out / "eval.json").write_text(PRECIOUS)
    _refused(["eval", *base, "--out", str(out)], capsys, "not written by vitkit")
    assert (out / "eval.json").read_text() == PRECIOUS and thesis.read_text() == PRECIOUS
    before = sorted(os.listdir(m))
    _refused(["eval", *base, "--out", str(m)], capsys, "is the input")
    assert sorted(os.listdir(m)) == before


def test_most_recent_run_is_the_one_that_trained_last_and_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old, new = _model(tmp_path / "runs" / "old" / "best"), _model(tmp_path / "runs" / "new" / "best")
    t = time.time()
    for p in old.iterdir():
        os.utime(p, (t - 3600, t - 3600))
    for p in new.iterdir():
        os.utime(p, (t - 60, t - 60))
    os.utime(new.parent, (t - 60, t - 60))
    (old.parent / "eval.json").write_text("{}")  # evaluating the old run moves its folder's mtime, not its training
    assert old.parent.stat().st_mtime > new.parent.stat().st_mtime
    assert latest_run("runs") == Path("runs") / "new"
    assert main(["predict", "sample:china.jpg", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["model"] == str(Path("runs") / "new")
    assert f"using the most recent training run: {Path('runs') / 'new'} (last trained " in cap.err


# -------------------------------------------------------------------------------------- explain
def test_explain_keeps_user_files_never_follows_links_nor_writes_onto_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    m = _model(tmp_path / "m")
    base = ["sample:china.jpg", "--model", str(m), "--layers", "0", "--filters", "4", "--explore-classes", "1"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text(PRECIOUS)
    _refused(["explain", *base, "--out", str(mine)], capsys, "not empty")
    _refused(["explain", *base, "--out", str(mine), "--overwrite"], capsys, "vitkit wrote nothing there")
    (tmp_path / "link").symlink_to(mine, target_is_directory=True)
    _refused(["explain", *base, "--out", str(tmp_path / "link")], capsys, "symbolic link")
    _refused(["explain", *base, "--out", str(m)], capsys, "is the input")
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == PRECIOUS
    # the default folder holds the latest report: a second explain replaces vitkit's files there only
    assert main(["explain", *base]) == 0
    (tmp_path / "explain_out" / "notes.txt").write_text(PRECIOUS)
    capsys.readouterr()
    assert main(["explain", *base]) == 0
    assert "kept 1 file(s) it did not write: notes.txt" in capsys.readouterr().err
    assert (tmp_path / "explain_out" / "notes.txt").read_text() == PRECIOUS
    assert (tmp_path / "explain_out" / "report.html").is_file()

"""vitkit's own format: a directory with ``config.json`` and ``model.safetensors``. No pickle.

``config.json`` holds ``{"format": "vitkit", "format_version": 1, "config": {ViTConfig fields},
"preprocess": {vitkit.preprocess.Preprocess fields} | null, "labels": [...] | null, "pretrained_info": {...} | null}`` so a model
can be rebuilt from its files alone. Files are written atomically (temporary file in the same
directory, flush + fsync, rename), so a crash while saving never leaves a half-written file in
place of a good one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ViTConfig
from .errors import CheckpointError, ConfigError, VitkitError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# atomic_write's temporary files: ``.NAME.vitkit-XXXXXXXX.tmp`` (mkstemp's 8 random characters). A
# killed process leaves one behind; vitkit.output removes exactly these when a command claims the folder.
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.vitkit-[a-z0-9_]{8}\.tmp$")

# Checks run before every atomic write: vitkit.output adds its own while a command holds an output
# claim (no symlink on the way, never over a file vitkit did not write, recorded in the manifest).
WRITE_CHECKS: list[Callable[[Path], None]] = []


def atomic_write(path: str | Path, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then fsync and rename onto ``path``; the old file survives a crash."""
    path = Path(path)
    for check in WRITE_CHECKS:
        check(path)
    with _one_line_when_full(path):  # a full inode table fails here already
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.vitkit-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
        try:  # persist the rename itself
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        with _one_line_when_full(path):
            raise
    return path


@contextlib.contextmanager
def _one_line_when_full(path: Path):
    """Re-raise a full disk / quota met while writing ``path`` as a WriteError naming it."""
    try:
        yield
    except BaseException as e:
        why = _write_failure(e, path)
        if why:
            raise WriteError(f"cannot write {path}: {why}; "
                             f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}"
                             ) from e
        raise


# A full disk or quota while saving becomes one line naming the file (a CLI prints it as
# "vitkit train: error: cannot write runs/x/best/model.safetensors: no space left on device; ...").
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(e: BaseException, path: Path) -> str | None:
    """'no space left on device' (or the like) when ``e`` is a full disk / quota, else None.

    Each writer says "disk full" its own way (seen on a full 64 KiB tmpfs): Python, pyarrow and PIL
    raise OSError(ENOSPC); safetensors a SafetensorError "Error while serializing: I/O error: No
    space left on device (os error 28)" (Rust's io::Error, no errno attribute); faiss a
    RuntimeError "... write error in F: 4051 != 2560000 (No space left on device)"; torch.save a
    RuntimeError "... unexpected pos 576 vs 534" (a short write) or "... file write failed"."""
    if isinstance(e, VitkitError) or not isinstance(e, Exception):
        return None
    if isinstance(e, OSError) and e.errno in _NO_ROOM:
        return os.strerror(e.errno).lower()
    text = str(e)
    os_error = re.search(r"\(os error (\d+)\)", text)
    for code in _NO_ROOM:
        if (os_error and int(os_error.group(1)) == code) or os.strerror(code) in text:
            return os.strerror(code).lower()
    if isinstance(e, RuntimeError) and re.search(r"write failed|failed writing|unexpected pos \d+ vs \d+", text):
        import shutil

        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            return "the write failed"
        return f"the write failed ({free:,} bytes free on that disk)"
    return None


class WriteError(VitkitError, OSError):
    """A file could not be written (disk full, quota); still an OSError for callers that catch those."""


def _file_mode(path: Path) -> int:
    """The mode an ordinary ``open(path, "w")`` would give: the old file's, else 0666 & ~umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write tensors as safetensors (contiguous CPU copies; shared storage is split)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_pretrained(model, directory: str | Path, **extra: Any) -> Path:
    """Write ``model`` (a :class:`vitkit.ViT`) to ``directory`` in vitkit's format."""
    directory = Path(directory)
    with _one_line_when_full(directory / WEIGHTS_NAME):
        directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "vitkit",
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "preprocess": _preprocess_dict(getattr(model, "preprocess_cfg", None)),
        "labels": getattr(model, "labels", None),
        "pretrained_info": getattr(model, "pretrained_info", None),
    }
    meta.update(extra)
    save_state_dict(model.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, default=str) + "\n")
    return directory


def _preprocess_dict(pre: Any) -> dict[str, Any] | None:
    from .preprocess import Preprocess

    return None if pre is None else Preprocess.from_dict(pre).to_dict()


def is_vitkit_dir(path: str | Path) -> bool:
    p = Path(path)
    cfg = p / CONFIG_NAME
    if not (p.is_dir() and cfg.is_file() and (p / WEIGHTS_NAME).is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == "vitkit"
    except (OSError, ValueError):
        return False


def read_meta(directory: str | Path) -> dict[str, Any]:
    cfg = Path(directory) / CONFIG_NAME
    try:
        meta = json.loads(cfg.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}") from e
    except ValueError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from e
    if meta.get("format") != "vitkit" or "config" not in meta:
        raise CheckpointError(f"{cfg} is not a vitkit config (expected 'format': 'vitkit' and a 'config' entry)")
    labels, n = meta.get("labels"), (meta["config"] or {}).get("num_classes") if isinstance(meta["config"], dict) else None
    if labels is not None and (not isinstance(labels, list) or (isinstance(n, int) and n > 0 and len(labels) != n)):
        got = f"{len(labels)} names" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise CheckpointError(f"{cfg}: field 'labels' has {got} but config.num_classes is {n}; "
                              "fix or remove the list (one name per output)")
    return meta


def config_json_problem(directory: str | Path) -> str | None:
    """Why ``directory/config.json`` (or that of its best/ or last/) cannot be parsed, naming the
    file and the JSON error; None when each present one parses (or there is none)."""
    for d in (Path(directory), Path(directory) / "best", Path(directory) / "last"):
        cfg = d / CONFIG_NAME
        if cfg.is_file():
            try:
                json.loads(cfg.read_text())
            except UnicodeDecodeError as e:
                return f"{cfg} is not a text file ({e.reason} at byte {e.start})"
            except ValueError as e:
                return f"{cfg} is not valid JSON: {e}"
            except OSError as e:
                return f"cannot read {cfg}: {e.strerror or e}"
    return None


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        from .interop.common import check_extension

        check_extension(path)  # a pickle named .safetensors: say that, not "header too large"
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def read_converted(directory: str | Path):
    """A vitkit model directory (or run directory) as a :class:`vitkit.interop.common.Converted`
    bundle: config, tensors, preprocessing, labels and the saved ``pretrained_info``, without
    building a model (the one strict loader, :func:`vitkit.interop.load_converted`, does)."""
    from .interop.common import Converted
    from .preprocess import Preprocess

    directory = resolve_model_dir(directory)
    meta = read_meta(directory)
    where = directory / CONFIG_NAME
    try:
        config = ViTConfig.from_dict(meta["config"])
        pre = Preprocess.coerce(meta.get("preprocess"), where=str(where))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}" if str(where) not in str(e) else str(e)) from e
    state = load_safetensors(directory / WEIGHTS_NAME)
    info = meta.get("pretrained_info") or {}
    if info.get("pos_resample") and "pos_resample" not in meta["config"]:
        # saved before ViTConfig.pos_resample: the source's resampling was kept in pretrained_info
        config = config.replace(pos_resample=str(info["pos_resample"]))
    conv = Converted(config=config, state=state, format="vitkit", source=str(directory), preprocess=pre,
                     labels=meta.get("labels"),
                     info={k: v for k, v in info.items() if k not in ("report", "pos_resample")})
    return conv


def load_model(directory: str | Path, device: str | torch.device = "cpu", strict: bool = True, **overrides: Any):
    """Rebuild a :class:`vitkit.ViT` from a directory written by :func:`save_pretrained` (bit-exact).

    ``overrides`` change config fields (a changed ``num_classes`` then mis-shapes the head: a
    CheckpointError, or with ``strict=False`` a fresh head and everything else loaded);
    ``image_size=`` loads at the saved size and resamples the learned position table (sin/cos
    recomputed), as ``model.set_image_size``. Loads through the same strict name-and-shape
    check as every other format (:func:`vitkit.interop.load_converted`)."""
    from .interop import load_converted

    conv = read_converted(directory)
    new_size = overrides.pop("image_size", None)
    if overrides:
        conv.config = conv.config.replace(**overrides)
    adapt = {"image_size": new_size} if new_size is not None else {}
    return load_converted(conv, adapt=adapt, strict=strict, device=device)


# --------------------------------------------------------------------------- run directories
# `vitkit train` writes runs/<timestamp>/ with best/ and last/ in this format (see vitkit.train).
RUNS_ROOT = "runs"


def resolve_model_dir(path: str | Path) -> Path:
    """A vitkit model directory from: the directory itself, its model.safetensors, or a training
    run directory (its ``best/``, else ``last/``). Raises CheckpointError saying what was found."""
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        p = p.parent
    if is_vitkit_dir(p):
        return p
    for sub in ("best", "last"):
        if is_vitkit_dir(p / sub):
            return p / sub
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    problem = config_json_problem(p)
    if problem:
        raise CheckpointError(problem)
    if (p / CONFIG_NAME).is_file():  # someone else's checkpoint dir: say whose, and what reads it
        from .interop import detect_format
        from .interop.formats import FORMATS

        try:
            what = f"a {FORMATS[detect_format(p)].what}"
        except CheckpointError:
            what = "no checkpoint format vitkit knows"
        raise CheckpointError(f"{p} is not a vitkit model directory: its {CONFIG_NAME} has no \"format\": \"vitkit\" "
                              f"key ({what}); vitkit.from_pretrained reads it, as every vitkit command does")
    raise CheckpointError(f"{p} is neither a vitkit model directory (config.json + model.safetensors) "
                          "nor a training run (with best/ or last/)")


# A run's own training record: the files only training writes. Their newest time is when the run last
# trained; the folder's mtime is not (any file written into it moves it: an eval.json, a note).
TRAINING_RECORD = ("metrics.jsonl", "train_state.pt", "summary.json", f"best/{WEIGHTS_NAME}", f"last/{WEIGHTS_NAME}")


def trained_at(run: str | Path) -> float | None:
    """When ``run`` last trained (the newest of its :data:`TRAINING_RECORD` files), or None."""
    times = [os.stat(p).st_mtime for p in (Path(run) / n for n in TRAINING_RECORD) if p.is_file()]
    return max(times) if times else None


def latest_run(root: str | Path = RUNS_ROOT) -> Path | None:
    """The training run under ``root`` that holds a model and trained last (by its own training
    record, :func:`trained_at`), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [d for d in root.iterdir() if d.is_dir() and (is_vitkit_dir(d / "best") or is_vitkit_dir(d / "last"))]
    return max(runs, key=lambda d: (trained_at(d) or 0.0, d.name)) if runs else None


def model_source_or_latest_run(source: str | Path | None, root: str | Path = RUNS_ROOT,
                               say: Callable[[str], None] | None = None) -> str:
    """``source`` if given, else the most recent training run under ``root`` (``say`` is told
    which, and when it trained); with neither, a CheckpointError that says how to get a model."""
    if source is not None:
        return str(source)
    run = latest_run(root)
    if run is None:
        raise CheckpointError(
            f"no model given and no training run found under {root}/. Train one first with `make demo` or "
            "`vitkit train`, or pass --model (a vitkit model directory, a training run directory, or a "
            "pretrained source such as timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)")
    if say is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(trained_at(run) or 0.0))
        say(f"using the most recent training run: {run} (last trained {when}; --model to choose another)")
    return str(run)

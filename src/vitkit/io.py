"""Writing files, safely, and finding training runs. Nothing here reads a checkpoint into a model
(that is :mod:`vitkit.interop`; vitkit's own format is :mod:`vitkit.interop.vitkit_format`), and
nothing here imports interop, the model or training: every layer above may write through it.

* atomic writes (:func:`atomic_write`, :func:`atomic_write_text`): temporary file in the same
  directory, flush + fsync, rename, so a crash while saving never leaves a half-written file in
  place of a good one; a full disk is one line naming the file.
* safetensors (:func:`save_state_dict`, :func:`load_safetensors`) and what a weight file holds by
  its first bytes (:func:`sniff_weights`, :func:`check_extension`).
* vitkit's own directory, written (:func:`save_pretrained`, :func:`save_image_text`): ``config.json``
  holds ``{"format": "vitkit", "format_version": 1, "config": {ViTConfig fields}, "preprocess":
  {vitkit.preprocess.Preprocess fields} | null, "labels": [...] | null, "pretrained_info": {...} |
  null}`` next to ``model.safetensors``, so a model can be rebuilt from its files alone. No pickle.
* run directories (:func:`latest_run`, :func:`model_source_or_latest_run`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, VitkitError

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


# vitkit's image-text directory: the image tower as above, plus (layout: vitkit.text.io)
TEXT_CONFIG_NAME = "text_config.json"
TEXT_WEIGHTS_NAME = "text_model.safetensors"
TOKENIZER_DIR = "tokenizer"


def save_image_text(model, directory: str | Path) -> Path:
    """Write ``model`` (an ImageTextModel) to ``directory``: the image tower as :func:`save_pretrained`
    writes it, the text tower and the logit scale / bias, the tokenizer's files."""
    d = Path(directory)
    save_pretrained(model.vision, d, text_tower=TEXT_CONFIG_NAME)
    state = dict(model.text.state_dict())
    state["logit_scale"] = model.logit_scale.detach()
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach()
    save_state_dict(state, d / TEXT_WEIGHTS_NAME, metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save(d / TOKENIZER_DIR)
    meta = {"format": "vitkit-text", "format_version": 1, "config": model.text.config.to_dict(), "loss": model.loss,
            "pretrained_info": {k: v for k, v in (model.pretrained_info or {}).items() if k != "report"} or None}
    atomic_write_text(d / TEXT_CONFIG_NAME, json.dumps(meta, indent=2, default=str) + "\n")
    return d


def is_vitkit_dir(path: str | Path) -> bool:
    p = Path(path)
    cfg = p / CONFIG_NAME
    if not (p.is_dir() and cfg.is_file() and (p / WEIGHTS_NAME).is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == "vitkit"
    except (OSError, ValueError):
        return False


# What a weight file's first bytes say it is, and the extensions that claim each kind.
_KINDS = {"safetensors": ("a safetensors file", ".safetensors"), "numpy": ("a NumPy .npz archive", ".npz"),
          "torch": ("a PyTorch checkpoint (torch.save)", ".pth")}
_CLAIMS = {".safetensors": "safetensors", ".npz": "numpy", ".pth": "torch", ".pt": "torch", ".bin": "torch",
           ".ckpt": "torch"}


def sniff_weights(path: str | Path) -> str | None:
    """What a weight file holds, by its content, never its name: "safetensors" (an 8-byte
    little-endian header length that fits the file, then the JSON header's ``{``), "numpy" (a zip of
    ``.npy`` members: ``np.savez``), "torch" (``torch.save``'s zip, or a legacy pickle: protocol 2
    and later start with 0x80); None when it is none of these."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
        if len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
            return "safetensors"
        if head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            return "numpy" if names and all(n.endswith(".npy") for n in names) else "torch"
    except (OSError, zipfile.BadZipFile):
        return None
    return "torch" if head[:1] == b"\x80" else None


def check_extension(path: str | Path) -> str | None:
    """The kind :func:`sniff_weights` finds; a CheckpointError when the file's extension claims
    another kind (a safetensors file named .pth, a pickle named .safetensors), saying which."""
    p = Path(path)
    kind, claimed = sniff_weights(p), _CLAIMS.get(p.suffix.lower())
    if kind is not None and claimed is not None and kind != claimed:
        raise CheckpointError(f"{p} is {_KINDS[kind][0]}, not {_KINDS[claimed][0]}: its extension {p.suffix} is "
                              f"wrong; rename it to {p.stem}{_KINDS[kind][1]}")
    return kind


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        check_extension(path)  # a pickle named .safetensors: say that, not "header too large"
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


# --------------------------------------------------------------------------- run directories
# `vitkit train` writes runs/<timestamp>/ with best/ and last/ in this format (see vitkit.train).
RUNS_ROOT = "runs"


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

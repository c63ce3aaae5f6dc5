"""Run directories: one directory belongs to one run. Built on :func:`vitkit.output.claim_output`,
the one writer every command uses (manifest, lock, no symlinks, never onto an input).

- ``new_run_name()`` makes ``runs/<YYYYmmdd-HHMMSS>-<pid><random>``: unique even when two runs start
  in the same second (the directory is created with ``mkdir(exist_ok=False)``, so two processes can
  never be handed the same name).
- ``claim_run_dir(path, overwrite=, resume=, inputs=)`` is a context manager that yields the directory
  and holds an exclusive lock on ``<run>/.vitkit.lock`` for the life of the run:

  * a new run refuses a directory that already holds a run (the message names ``--resume DIR`` and a
    fresh ``--out``), unless ``overwrite=True``, which removes the files vitkit wrote there (its
    manifest, and the run's own file names, :data:`RUN_FILES`) and keeps, and names, any other file;
    a non-empty directory vitkit never wrote in is refused either way; a directory holding only what
    vitkit wrote for a run that stopped before its first checkpoint (:func:`trained_nothing`) is
    replaced without ``overwrite``, said (nothing trained is lost);
  * ``resume=True`` requires an existing run;
  * a second writer (train, resume, or eval writing into the run) fails at once while the first one
    lives, naming the holder (pid, host, start time, command). The lock is ``fcntl.flock``: the kernel
    drops it when the holding process dies (even by SIGKILL), so a stale lock file from a killed run
    never blocks, and the temporaries a killed save left behind are removed when the run is claimed;
  * the lock file, and every file the run writes, is never written through a symbolic link;
  * the run directory may not be, sit inside, or (for a new run) contain one of ``inputs`` (the
    data directory, the initial weights).

Under torchrun only rank 0 claims the directory (it is the only rank that writes there); the other
ranks learn its name from rank 0 (:func:`run_directory`, what ``vitkit.train.loop.train`` holds).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ConfigError
from ..output import LOCK_NAME, OutputBusy, OutputNotEmpty, claim_output

__all__ = ["LOCK_NAME", "RUN_FILES", "RunDirBusy", "claim_run_dir", "holds_run", "new_run_name"]

# Files whose presence means "a run lives here" (the lock file alone does not: a run that failed
# before writing anything leaves nothing worth protecting).
RUN_MARKERS = ("config.yaml", "train_state.pt", "metrics.jsonl", "summary.json", "best", "last")
# The names a run writes. Most go through io.atomic_write and so into the run's manifest; these
# are vitkit's in a run directory whatever the manifest says: the appended metrics.jsonl, the
# plots, TensorBoard's event files, and the files of runs written before the manifest existed.
RUN_FILES = ("config.yaml", "train_state.pt", "metrics.jsonl", "summary.json", "test_report.json", "curves.png",
             "confusion_matrix.png", "eval.json", "confusion_matrix_eval.png", "events.out.tfevents.*",
             "best/config.json", "best/model.safetensors", "last/config.json", "last/model.safetensors")

RunDirBusy = OutputBusy  # another live process holds the run directory's lock
_BUSY_HINT = "wait for it to finish, or write this run elsewhere with a fresh --out"


def new_run_name(root: str | Path = "runs") -> Path:
    """Create and return a fresh run directory ``root/<timestamp>-<suffix>``.

    The suffix (pid + 4 random hex digits) makes same-second starts distinct; ``mkdir`` without
    ``exist_ok`` makes the choice atomic even if two suffixes ever collided (we then draw again)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = root / f"{stamp}-{os.getpid()}{secrets.token_hex(2)}"
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a fresh run directory under {root}")  # pragma: no cover


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def trained_nothing(path: Path) -> bool:
    """A run that stopped before its first checkpoint (killed at startup, out of memory at its first
    step): no state, no weights, no results, no epoch recorded; its config.yaml at most."""
    metrics = path / "metrics.jsonl"
    return (not any((path / m).exists() for m in ("train_state.pt", "best", "last", "summary.json"))
            and (not metrics.exists() or metrics.stat().st_size == 0))


def _dead_run(path: Path) -> str | None:
    return "a run that stopped before its first checkpoint (nothing trained)" if trained_nothing(path) else None


@contextlib.contextmanager
def claim_run_dir(path: str | Path | None, *, overwrite: bool = False, resume: bool = False,
                  inputs: Iterable = ()) -> Iterator[Path]:
    """Own ``path`` (None: a fresh ``new_run_name()``) for the duration of the ``with`` block."""
    fresh = path is None
    path = new_run_name() if path is None else Path(path)
    if resume and not holds_run(path):
        raise ConfigError(f"--resume {path}: no vitkit run there (no config.yaml / train_state.pt)")
    with contextlib.ExitStack() as stack:
        try:
            # a run vitkit started there that died before its first checkpoint is replaced (nothing is lost)
            out = stack.enter_context(claim_output(path, command="train", update=resume, overwrite=overwrite,
                                                   inputs=inputs, own=RUN_FILES, fresh=fresh, busy_hint=_BUSY_HINT,
                                                   replaceable=_dead_run))
        except OutputNotEmpty:  # checked under the lock: a live run gets the "in use" message instead
            if not holds_run(path):
                raise ConfigError(f"{path} is not empty and is not a vitkit run directory; refusing to write a run "
                                  f"there (and --overwrite never deletes files vitkit did not write): choose a fresh "
                                  f"--out DIR") from None
            if trained_nothing(path):
                raise ConfigError(f"{path} holds a run that stopped before its first checkpoint; start it again with "
                                  f"--resume {path} (its recorded config), write this run to a fresh --out DIR, or "
                                  f"replace it with --overwrite") from None
            raise ConfigError(f"{path} already holds a run; continue it with --resume {path}, write this run "
                              f"to a fresh --out DIR, or replace it with --overwrite") from None
        yield out.path


@contextlib.contextmanager
def run_directory(cfg, resume, dist) -> Iterator[Path]:
    """The one place a training run's directory is chosen, created and held for the life of the run:
    :func:`claim_run_dir` (``--resume RUN``, ``--out DIR`` or a fresh default name). Rank 0 claims
    it and tells the other ranks (a :class:`vitkit.distributed.DistInfo` ``dist``) the path."""
    import torch

    path = Path(resume) if resume is not None else (Path(cfg.out) if cfg.out else None)
    if dist.is_main:
        cm = claim_run_dir(path, overwrite=cfg.overwrite, resume=resume is not None,
                           inputs=(cfg.data_dir, cfg.model, cfg.pretrained))
    else:
        cm = contextlib.nullcontext(None)
    with cm as run_dir:
        if dist.enabled:
            box = [str(run_dir) if run_dir is not None else None]
            torch.distributed.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        yield Path(run_dir)

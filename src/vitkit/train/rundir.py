"""Run directories: one directory belongs to one run.

- ``new_run_name()`` makes ``runs/<YYYYmmdd-HHMMSS>-<pid><random>``: unique even when two runs start
  in the same second (the directory is created with ``mkdir(exist_ok=False)``, so two processes can
  never be handed the same name).
- ``claim_run_dir(path, overwrite=, resume=)`` is a context manager that yields the directory and holds
  an exclusive lock on ``<run>/.vitkit.lock`` for the life of the run:

  * a new run refuses a directory that already holds a run (the message names ``--resume DIR`` and a
    fresh ``--out``), unless ``overwrite=True``, which clears it first; a non-empty directory that
    is not a vitkit run is refused either way (we never delete files we did not write);
  * ``resume=True`` requires an existing run;
  * a second writer (train or resume) fails at once while the first one lives, naming the holder
    (pid, host, start time). The lock is ``fcntl.flock``: the kernel drops it when the holding process
    dies (even by SIGKILL), so a stale lock file from a killed run never blocks.

Under torchrun only rank 0 claims the directory (it is the only rank that writes there); the other
ranks learn its name from rank 0 (``train.loop.train``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".vitkit.lock"
# Files whose presence means "a run lives here" (the lock file alone does not: a run that failed
# before writing anything leaves nothing worth protecting).
RUN_MARKERS = ("config.yaml", "train_state.pt", "metrics.jsonl", "summary.json", "best", "last")

try:  # POSIX; elsewhere runs are not locked (documented in docs/training.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunDirBusy(ConfigError):
    """Another live process holds the run directory's lock."""


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


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK_NAME]


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "unknown process"


@contextlib.contextmanager
def claim_run_dir(path: str | Path | None, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Own ``path`` (None: a fresh ``new_run_name()``) for the duration of the ``with`` block."""
    created = False
    if path is None:
        path, created = new_run_name(), True
    path = Path(path)
    if resume:
        if not holds_run(path):
            raise ConfigError(f"--resume {path}: no vitkit run there (no config.yaml / train_state.pt)")
    elif path.exists():
        if not path.is_dir():
            raise ConfigError(f"--out {path} is a file, not a directory")
        if not holds_run(path):  # refuse a foreign directory before creating anything in it
            _check_new(path, overwrite)
    else:
        path.mkdir(parents=True, exist_ok=True)
        created = True

    lock_path = path / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    _HELD.add(fd)
    ok = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirBusy(f"{path} is in use by another vitkit run ({_holder(lock_path)}); wait for it to "
                                 f"finish, or write this run elsewhere with a fresh --out") from None
        if not resume:  # checked under the lock: a live run gets the "in use" message above instead
            _check_new(path, overwrite)
            if overwrite:
                for p in _contents(path):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        ok = True
        yield path
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the flock (forked children closed their copies: _close_held_in_child)
        if not ok or created:
            _remove_if_unused(path, created)


# A forked child (a DataLoader worker) inherits the lock's file descriptor, and flock holds until every
# descriptor of the open file is closed: persistent workers that outlive an interrupted run (until
# their loader is collected) would keep its directory "in use" by a dead run. Children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def _check_new(path: Path, overwrite: bool) -> None:
    """A new run may use an empty directory, or a run directory with ``overwrite``; nothing else."""
    if holds_run(path):
        if not overwrite:
            raise ConfigError(f"{path} already holds a run; continue it with --resume {path}, write this run "
                              f"to a fresh --out DIR, or replace it with --overwrite")
        return
    if _contents(path):
        raise ConfigError(f"{path} is not empty and is not a vitkit run directory; refusing to write a run there "
                          f"(and --overwrite never deletes files vitkit did not write): choose a fresh --out DIR")


def _remove_if_unused(path: Path, created: bool) -> None:
    """A run we created that failed before writing anything leaves no empty directory behind."""
    if not created:
        return
    with contextlib.suppress(OSError):
        if not _contents(path):
            (path / LOCK_NAME).unlink(missing_ok=True)
            path.rmdir()

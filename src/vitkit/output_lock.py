"""The lock behind :func:`vitkit.output.claim_output` (its rule 5, one writer at a time), and the
errors an output claim raises.

The claim holds ``fcntl.flock`` on ``.vitkit.lock`` in the directory (``.NAME.vitkit.lock`` beside
a file target), holding ``vitkit CMD, pid N on HOST, since TIME``; a second claim fails at once
naming that holder. The kernel drops the lock when the process dies, so a lock file left by a
killed process never blocks. (On a platform without ``fcntl``, i.e. Windows, outputs are not locked.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = ".vitkit.lock"

try:  # POSIX; elsewhere outputs are not locked (documented in docs/training.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class OutputError(ConfigError):
    """An output target vitkit refuses to write (not empty, a symlink, an input, not vitkit's)."""


class OutputNotEmpty(OutputError):
    """A new output's target already holds files (see ``claim_output``)."""


class OutputBusy(OutputError):
    """Another live process holds the target's lock."""


# A forked child (a DataLoader worker) inherits the lock's file descriptor, and flock holds until every
# descriptor of the open file is closed: persistent workers that outlive an interrupted run (until
# their loader is collected) would keep its output "in use" by a dead process. Children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def holder(lock_path: str | Path) -> str:
    """What the lock file says about its holder (``vitkit CMD, pid N on HOST, since TIME``)."""
    try:
        if os.path.islink(lock_path):
            return "unknown process"
        text = Path(lock_path).read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text[:200] or "unknown process"


def take_lock(lock_path: Path, target: Path, command: str, busy_hint: str) -> int:
    """An exclusive flock on ``lock_path`` (created, never through a link), with our holder line."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(20):
        try:
            fd = os.open(lock_path, flags, 0o644)
        except OSError as e:
            if os.path.islink(lock_path):
                raise OutputError(f"{lock_path} is a symbolic link; vitkit never writes through one (remove "
                                  "it)") from None
            raise OutputError(f"cannot create the lock file {lock_path}: {e.strerror or e}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a FIFO, or a hard link to someone's file
            os.close(fd)
            raise OutputError(f"{lock_path} is not vitkit's lock file (not a plain file of its own); remove it")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(target, holder(lock_path), busy_hint) from None
        # the previous holder removes the file on release: we may hold a lock on a removed file
        try:
            same = os.lstat(lock_path).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if same:
            _HELD.add(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"vitkit {command}, pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            return fd
        os.close(fd)
    raise OutputBusy(f"{target}: could not take its lock {lock_path}; {busy_hint}")  # pragma: no cover


def release_lock(fd: int, lock_path: Path) -> None:
    with contextlib.suppress(OSError):
        if os.lstat(lock_path).st_ino == os.fstat(fd).st_ino:
            os.unlink(lock_path)  # still held: no one else can be using this file
    _HELD.discard(fd)
    os.close(fd)  # releases the flock (forked children closed their copies: _close_held_in_child)


def _busy(target: Path, who: str, hint: str) -> OutputBusy:
    return OutputBusy(f"{target} is in use by another vitkit process ({who}); {hint}")


def refuse_if_busy(target: str | Path, busy_hint: str) -> None:
    """Fail at once, as a claim would, when another live process holds ``target``'s lock (a cheap
    early check, before a long computation whose result goes there; the claim checks again)."""
    target = Path(target)
    lock_path = target / LOCK_NAME if target.is_dir() else target.with_name(f".{target.name}.vitkit.lock")
    if fcntl is None or os.path.islink(lock_path) or not lock_path.is_file():
        return
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(target, holder(lock_path), busy_hint) from None
    finally:
        os.close(fd)

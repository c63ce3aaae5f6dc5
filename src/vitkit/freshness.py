"""The one freshness rule for what vitkit computes from a file and keeps: the rows of ``vitkit embed``,
the stored vectors ``vitkit search`` reuses for query files, the FAISS index saved beside a table.

A :class:`Stamp` records what a result was computed from: the file's absolute path, its size, its
mtime in nanoseconds and a BLAKE2b digest of its bytes, taken *before* the file is read (so a file
that changes while it is being read looks changed next time, never fresh). :func:`check` says:

* ``gone``: nothing there any more (or no longer a regular file);
* ``fresh``: same size and mtime_ns (one ``stat``, no read: make's and git's rule), or same size and
  digest under a new mtime (touched, copied, checked out again: nothing to recompute; the new
  stamp is returned so the caller can record it);
* ``changed``: anything else.

The digest is always taken: BLAKE2b reads ~0.9 GB/s on this project's CPU, 1 ms for a 12-megapixel
JPEG (0.9 MB) whose decode alone takes 58 ms, so it adds under 2% to embedding a photo.
"""

from __future__ import annotations

import hashlib
import os
import stat as _stat
from dataclasses import asdict, dataclass
from pathlib import Path

FRESH, CHANGED, GONE = "fresh", "changed", "gone"


@dataclass(frozen=True)
class Stamp:
    file: str  # absolute path (see file_key)
    size: int
    mtime_ns: int
    blake2b: str | None = None  # hex digest of the bytes (128-bit)

    def to_dict(self) -> dict:
        return asdict(self)


def file_key(path: str | Path) -> str:
    """The absolute path a result is filed under: the folder resolved (``..``, symlinked folders),
    the file's own name kept, so a symlinked file that is pointed elsewhere reads as changed (its
    ``stat`` follows the link) instead of leaving a row under the old target's name."""
    p = Path(path).expanduser()
    return str(p.parent.resolve() / p.name)


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stamp(path: str | Path) -> Stamp:
    """The stamp of a regular file, taken now (stat, then digest). OSError when it cannot be read."""
    key = file_key(path)
    st = os.stat(key)
    if not _stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"{key} is not a regular file")
    return Stamp(key, st.st_size, st.st_mtime_ns, _digest(key))


def check(saved: Stamp) -> tuple[str, Stamp | None]:
    """(``fresh`` | ``changed`` | ``gone``, the file's current stamp when it had to be taken)."""
    try:
        st = os.stat(saved.file)
    except (FileNotFoundError, NotADirectoryError):
        return GONE, None
    except OSError:
        return CHANGED, None  # there but unreadable: recomputing it reports why
    if not _stat.S_ISREG(st.st_mode):
        return GONE, None
    if st.st_size != saved.size:
        return CHANGED, None
    if st.st_mtime_ns == saved.mtime_ns:
        return FRESH, saved
    if saved.blake2b is None:
        return CHANGED, None
    try:
        now = stamp(saved.file)
    except OSError:
        return CHANGED, None
    return (FRESH if now.blake2b == saved.blake2b and now.size == saved.size else CHANGED), now

"""One progress bar for every long job: tqdm on a terminal, plain periodic lines elsewhere.

A tqdm bar written to a log file or CI redraws with carriage returns (tens of KB per run that
nobody can read). When the stream is not a terminal, ``progress_bar`` returns a small object with
tqdm's interface (``update``, ``set_postfix``, ``close``, iteration) that prints one line every
``every`` seconds and one at the end instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


class _LineProgress:
    """tqdm's interface, printing ``desc: n/total [postfix]`` lines at most every ``every`` s."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, file: TextIO | None = None, every: float = 30.0, unit: str = "it",
                 **_ignored: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file or sys.stderr
        self.every = every
        self.postfix = ""
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        items = dict(ordered_dict or {}, **kw)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print()

    def refresh(self) -> None:
        pass

    def _print(self) -> None:
        total = f"/{self.total}" if self.total else ""
        post = f" [{self.postfix}]" if self.postfix else ""
        secs = time.monotonic() - self._t0
        print(f"{self.desc}: {self.n}{total} {self.unit} in {secs:.0f} s{post}", file=self.file, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n:
                self._print()

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, file: TextIO | None = None,
                 every: float = 30.0, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on a terminal; periodic plain lines when ``file`` (stderr by
    default) is not a terminal; nothing at all with ``disable=True``."""
    stream = file or sys.stderr
    if not disable and not (hasattr(stream, "isatty") and stream.isatty()):
        return _LineProgress(iterable, file=stream, every=every, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable, file=stream, dynamic_ncols=True, **kwargs)

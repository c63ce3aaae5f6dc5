"""Two-way rename tables: one list of (vitkit name, source name) templates per format, applied to
import a checkpoint *and* to export one, so the two directions cannot drift apart.

Templates are plain names with placeholders: ``{i}`` a block index (digits), ``{p}`` a parameter
kind (``weight`` or ``bias``). Tensor surgery that renaming cannot express (fusing q, k, v,
transposing a projection, folding a position row into the class token) is done by the format
module next to its table, in both directions, and named there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "w": r"(?P<w>\w+)"}


def _regex(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(_PLACEHOLDERS[m.group(1)])
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


class RenameTable:
    """``pairs``: (vitkit template, source template). A source template of ``""`` means the
    source has no such tensor (export skips it); a vitkit template of ``""`` drops a source tensor
    on import (e.g. a mask token inference never uses); the reason goes in ``dropped``."""

    def __init__(self, pairs: Iterable[tuple[str, str]], dropped: dict[str, str] | None = None) -> None:
        self.pairs = list(pairs)
        self.dropped = dict(dropped or {})
        self._to = [(_regex(src), dst) for dst, src in self.pairs if src]
        self._from = [(_regex(dst), src) for dst, src in self.pairs if dst and src]
        self._drop = [_regex(src) for src in self.dropped]

    @staticmethod
    def _apply(state: dict[str, torch.Tensor], rules) -> tuple[dict[str, torch.Tensor], list[str]]:
        out: dict[str, torch.Tensor] = {}
        unmatched: list[str] = []
        for k, v in state.items():
            for pat, template in rules:
                m = pat.fullmatch(k)
                if m:
                    if template:
                        out[template.format(**m.groupdict())] = v
                    break
            else:
                unmatched.append(k)
        return out, unmatched

    def to_vitkit(self, state: dict[str, torch.Tensor], notes: list[str] | None = None) -> tuple[
            dict[str, torch.Tensor], list[str]]:
        """Source names -> vitkit names; returns (renamed, source keys no rule knows)."""
        kept: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            hit = next((src for src, pat in zip(self.dropped, self._drop) if pat.fullmatch(k)), None)
            if hit is None:
                kept[k] = v
            elif notes is not None:
                notes.append(f"{k} ignored: {self.dropped[hit]}")
        return self._apply(kept, self._to)

    def from_vitkit(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """vitkit names -> source names; returns (renamed, vitkit keys the source has no name for)."""
        return self._apply(state, self._from)

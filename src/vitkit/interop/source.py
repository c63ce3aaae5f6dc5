"""What a format is, and what it reads from.

:class:`Source` is a checkpoint path as detection and the reader both see it: its tensors and its
JSON files are read once, on first use, and handed on (detection lists a file's keys, the reader
then converts the same tensors; a directory's ``config.json`` is parsed once). :class:`Format` is
one format: its names, how to recognise it, how to read it and how to write it. Each format
module of :mod:`vitkit.interop` exports one; :mod:`vitkit.interop.formats` lists them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError
from ..io import sniff_weights
from .common import Converted, read_json, read_state_dict


class Source:
    """A local checkpoint file or directory whose contents are read at most once each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tensors: dict[Path, dict[str, torch.Tensor]] = {}
        self._json: dict[Path, dict[str, Any]] = {}

    @classmethod
    def of(cls, source: Source | str | Path) -> Source:
        return source if isinstance(source, Source) else cls(source)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def directory(self) -> Path:
        """The directory itself, or the folder a file sits in (where its config.json would be)."""
        return self.path if self.path.is_dir() else self.path.parent

    def tensors(self, file: str | Path | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``file`` (default: the path itself), read once (:func:`read_state_dict`)."""
        f = Path(file) if file is not None else self.path
        if f not in self._tensors:
            self._tensors[f] = read_state_dict(f)
        return self._tensors[f]

    def keys(self) -> list[str]:
        """The tensor names of the file: from a safetensors header alone (no tensor is read), else
        from the tensors, which stay cached for the reader."""
        if self.path not in self._tensors and sniff_weights(self.path) == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(self.path), framework="pt") as f:
                    return list(f.keys())
            except (SafetensorError, OSError, ValueError):
                pass  # the full read below says what is wrong with the file
        return list(self.tensors())

    def json(self, file: str | Path) -> dict[str, Any]:
        """A parsed JSON file, read once; a CheckpointError naming it when it cannot be read."""
        f = Path(file)
        if f not in self._json:
            self._json[f] = read_json(f)
        return self._json[f]

    def config(self) -> dict[str, Any] | None:
        """The directory's parsed ``config.json``, or None when the path is no directory or has none
        readable (detection asks; :func:`vitkit.interop.vitkit_format.config_json_problem` says why)."""
        cfg = self.path / "config.json"
        if not (self.path.is_dir() and cfg.is_file()):
            return None
        try:
            return self.json(cfg)
        except CheckpointError:
            return None


Reader = Callable[[Source, ViTConfig | None, dict[str, Any] | None], Converted]
Writer = Callable[..., Path]  # (model, path, **options) -> what was written


@dataclass(frozen=True, eq=False)
class Format:
    """One weight format. ``read`` / ``write`` absent: the format is write-only / read-only.

    Detection (in registry order, the first that says yes wins): ``detect_dir`` for a directory,
    ``detect_file`` for a file by its content, ``detect_keys`` for a file by its tensor names.
    ``options``: the keyword options ``write`` takes (``export_to`` passes those, ignores others);
    ``writes_rope``: its layout holds rotary position embedding (DINOv3). ``tiny``: the ViTConfig
    fields of a small model the format round-trips, and ``tiny_hints`` what reading it back needs
    (tests/test_architecture.py builds one per format from these; None: a plain ViT)."""

    name: str
    what: str  # one line for --help, error messages and docs
    aliases: tuple[str, ...] = ()
    read: Reader | None = None
    write: Writer | None = None
    writes_dir: bool = False  # write() makes a directory (else one file)
    suffix: str = ".safetensors"  # of the file write() makes
    detect_dir: Callable[[Source], bool] | None = None
    detect_file: Callable[[Source], bool] | None = None
    detect_keys: Callable[[list[str]], bool] | None = None
    options: tuple[str, ...] = ()
    writes_rope: bool = False
    tiny: dict[str, Any] | None = None
    tiny_hints: dict[str, Any] = field(default_factory=dict)

    @property
    def reads(self) -> bool:
        return self.read is not None

    @property
    def writes(self) -> bool:
        return self.write is not None

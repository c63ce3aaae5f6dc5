"""Choices vitkit measures on the machine and keeps on disk, so that the same command on the same
machine makes the same choice every time, whatever the load was when it measured:

* which runtime runs a bf16 Predictor fastest per input shape (:mod:`vitkit.infer.backends`, file
  ``bf16_backends.json``);
* whether bf16 autocast speeds up a model's training step (``--amp auto``, :mod:`vitkit.train.amp`, file
  ``train_amp.json``): measured again per run, the ratio of a small model swung from 0.59x to 1.58x with
  the load on a 2-core machine, and the same command trained in fp32 one time and bf16 the next.

The files live under ``$VITKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitkit``, else ``~/.cache/vitkit``;
each entry is keyed by a hash of what decides the choice (:func:`key`: the CPU, torch's threads, the
versions, the model's architecture, the shape) and records those fields, the result and when it was
measured. A file that cannot be read is ignored and rewritten; ``VITKIT_BACKEND_CACHE=off`` neither reads
nor writes any of them; deleting a file forgets its choices.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import VitkitError
from .io import atomic_write_text

log = logging.getLogger("vitkit")

ENV = "VITKIT_BACKEND_CACHE"  # "off": no cached choice is read or written


def path(name: str) -> Path:
    """The cache file ``name``: ``$VITKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitkit``, else ``~/.cache/vitkit``."""
    root = os.environ.get("VITKIT_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitkit"
    return Path(root).expanduser() / name


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("off", "0", "no", "false")


def read(name: str) -> dict:
    """The file's entries; {} for a missing, unreadable or malformed file (rewritten at the next write)."""
    try:
        data = json.loads(path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}


def write(name: str, key_: str, entry: dict) -> None:
    """Add one entry, the file written whole and renamed over the old one (``vitkit.io.atomic_write_text``:
    a reader never sees half a file; of two processes writing at once one entry may be lost: it is measured
    again). ``entry`` gets the time of the measurement (``measured``)."""
    p = path(name)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        atomic_write_text(p, json.dumps({**read(name), key_: {**entry, "measured": when}}, indent=1,
                                        sort_keys=True) + "\n")
    except (OSError, VitkitError) as e:  # a read-only or full home: the choice still holds for this process
        log.info("could not write the cache %s (%s)", p, e)


def key(fields: dict) -> str:
    """The entry key of ``fields`` (what decides the choice)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def machine() -> dict:
    """What of this process decides every measured choice: the CPU, torch's threads and the versions."""
    from . import cpu

    try:
        from importlib.metadata import version

        ov = version("openvino")
    except Exception:  # noqa: BLE001 - not installed (or no metadata)
        ov = None
    return {"cpu": cpu.describe(), "threads": torch.get_num_threads(), "torch": torch.__version__, "openvino": ov}


def architecture(model: nn.Module) -> str:
    """What of ``model`` decides its speed, not its weights: its config (class and fields), else its
    parameters' names and shapes."""
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        return f"{type(model).__name__} {type(cfg).__name__}" + json.dumps(dataclasses.asdict(cfg), sort_keys=True,
                                                                             default=str)
    return type(model).__name__ + json.dumps([(n, list(p.shape)) for n, p in model.named_parameters()])

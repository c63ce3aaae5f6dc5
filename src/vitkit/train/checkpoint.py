"""Training state for resume, written atomically.

``train_state.pt`` holds only tensors and plain containers (dicts, lists, numbers, strings), so
it loads with ``torch.load(weights_only=True)``: no arbitrary pickle is executed on resume.
RNG states are stored as uint8 tensors / lists. The file is written to a temporary name, flushed,
fsynced and renamed (:func:`vitkit.io.atomic_write`), so a crash mid-save leaves the previous
checkpoint in place.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import atomic_write

STATE_NAME = "train_state.pt"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-loadable objects."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` a training state (tensors + plain containers only)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training state at {path} (was the run started with this vitkit?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling error, truncated file, ...
        raise CheckpointError(f"cannot read training state {path}: {e}") from e

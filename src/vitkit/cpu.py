"""What this CPU can do, read once, in one place: its name, its ISA flags, and which of vitkit's speed
paths they allow. Every CPU-dependent choice (the Predictor's bf16 walk, oneDNN kernels, benchmark
rows) asks here, so one switch turns a feature off everywhere:

``VITKIT_CPU_FEATURES_OFF`` — a comma-separated list of features to treat as absent: any flag name
from /proc/cpuinfo (``amx_bf16``, ``avx512_bf16``, ``amx_int8``, ``avx512_vnni``, ...), ``onednn``
(vitkit's oneDNN matmul paths), or ``all`` (every feature above and oneDNN). The test suite runs the
speed-path tests once more with ``all`` (tests/test_cpu_features.py), so the fallbacks a CPU without
these units takes are covered on every machine. It changes what vitkit chooses, not what torch's own
kernels do (``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` are torch's switches for that).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

OFF_ENV = "VITKIT_CPU_FEATURES_OFF"
# The flags that decide vitkit's paths and that a benchmark row names, in the order printed.
NAMED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
_SHORT = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "AVX-512-BF16",
          "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def _off() -> set[str]:
    return {f.strip().lower() for f in os.environ.get(OFF_ENV, "").split(",") if f.strip()}


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo (Linux); elsewhere the platform's name and no flags."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(val.split())
        elif key in ("model name", "Model", "CPU part") and not name:
            name = val.strip()
    return name or platform.processor() or platform.machine(), frozenset(flags)


def flags() -> frozenset[str]:
    """This CPU's ISA flags, less those switched off by ``VITKIT_CPU_FEATURES_OFF``."""
    off = _off()
    return frozenset() if "all" in off else _cpuinfo()[1] - off


def has(flag: str) -> bool:
    return flag in flags()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
    ``bf16``). Without it oneDNN emulates bf16 and is slower than fp32, so vitkit does not pick it."""
    f = flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in f
    return bool({"avx512_bf16", "amx_bf16"} & f)


def onednn_allowed() -> bool:
    """Whether vitkit may choose its oneDNN matmul paths (not switched off)."""
    return not ({"onednn", "all"} & _off())


def describe() -> str:
    """One line naming the CPU and the flags that decide vitkit's paths, e.g.
    ``AMD EPYC (AVX2, AVX-512, VNNI, AVX-512-BF16)``; switched-off features are named too."""
    name, _ = _cpuinfo()
    have = [_SHORT[f] for f in NAMED_FLAGS if has(f)]
    off = sorted(_off())
    text = f"{name} ({', '.join(have) if have else 'none of ' + '/'.join(_SHORT.values())})"
    return text + (f" [{OFF_ENV}={','.join(off)}]" if off else "")

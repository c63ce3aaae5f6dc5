"""Benchmark rows for the runtimes made for bf16 inference on the CPU, beside timm and the Predictor:
``torch.compile`` (inductor with freezing, bf16 weights) and OpenVINO's CPU plugin (bf16), each run
as ``Predictor(model, "bf16", backend=NAME)`` (:mod:`vitkit.infer.backends`), so the bench times the
very runtime a Predictor would choose. Their build (inductor's compile, OpenVINO's convert and
compile, per model and shape) is paid before timing and reported apart (``setup_s``); a runtime that
cannot run here gets a row that says why (``skipped``) instead of failing the benchmark.

``int8``: the static int8 Predictor (``Predictor(model, "int8", calibration=...)``, NNCF + OpenVINO on
the CPU's int8 units, :mod:`vitkit.infer.int8`), calibrated on scikit-learn's two real sample photos
through the model's own preprocessing: enough for its speed (the ranges do not change the kernels); its
agreement with fp32 is measured on real data by ``benchmarks/int8.py``. The "vitkit-int8" row of the
Predictor rows is the dynamic int8 a Predictor runs without calibration.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import cpu
from ..errors import ConfigError

RUNTIMES = ("compile", "openvino", "int8")
# what each row runs, for its note
WHAT = {"compile": "torch.compile (inductor, freezing) of the model's forward on bf16 weights",
        "openvino": "OpenVINO CPU plugin, bf16 hint, of the model's forward converted once",
        "int8": "static int8: NNCF post-training quantization calibrated on 2 real photos, run by OpenVINO"}
IMPL = {"compile": "compile-bf16", "openvino": "openvino-bf16", "int8": "static-int8"}
CALIBRATION = ("sample:china.jpg", "sample:flower.jpg")


@dataclass
class RuntimeRows:
    """The timed steps of the runtimes that built ("compile-bf16", ...), their notes and build seconds,
    and why the others cannot run here."""

    steps: dict[str, Callable[[], None]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    setup_s: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def finish(self, results: list) -> list:
        """``results`` (:class:`~vitkit.bench.throughput.BenchResult` rows) with each runtime's build time set, then one untimed row per runtime that could
        not run (the machine and the run's settings copied from the first row)."""
        out = [replace(r, setup_s=self.setup_s[r.impl]) if r.impl in self.setup_s else r for r in results]
        first = results[0]
        for impl, why in self.skipped.items():
            out.append(replace(first, impl=impl, dtype="int8" if impl == IMPL["int8"] else "bf16", times_s=[], median_s=None, images_per_s=None,
                               tflops=None, mfu=None, ratio_vs_timm=None, ratio_iqr=None, page_faults=None,
                               note=None, skipped=why))
        return out


def runtime_rows(model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> RuntimeRows:
    """Build ``Predictor(model, "bf16", backend=name)`` for each runtime in ``names`` and run it once on
    ``x`` (its build: compile or convert), timing both as its setup (the Predictor's bf16 copy of the
    weights is a small part of it)."""
    from ..infer import Predictor, backends

    bad = [n for n in names if n not in RUNTIMES]
    if bad:
        raise ConfigError(f"runtimes must be among {list(RUNTIMES)}, got {bad}")
    rows = RuntimeRows()
    for name in names:
        impl = IMPL[name]
        if name == "int8":
            from ..infer import int8

            why = int8.unavailable()
        else:
            why = backends.unavailable(name, text=False)
            if name == "openvino" and why:
                why = "not installed: pip install 'vitkit[openvino]'"
            if not why and not cpu.bf16_native():
                why = "this CPU has no native bf16 (AVX-512-BF16 / AMX-BF16): a bf16 Predictor runs fp32 here"
        if why:
            rows.skipped[impl] = why
            continue
        t0 = time.perf_counter()
        p = (Predictor(model, "int8", calibration=list(CALIBRATION)) if name == "int8"
             else Predictor(model, "bf16", backend=name))
        with torch.no_grad():
            p(x)  # the runtime builds on its first call of a shape (int8: at construction)
        secs = time.perf_counter() - t0
        if name == "int8":
            ran = p.path == "int8"
        else:
            ran = (p._chooser.chosen.get((tuple(x.shape), None)) if p._chooser is not None else None) == name
        if not ran:  # the Predictor fell back (a failed build) or its engine is off
            rows.skipped[impl] = "; ".join(p.notes) or "the Predictor could not run this model on the runtime"
            continue
        rows.steps[impl] = functools.partial(p, x)
        rows.setup_s[impl] = secs
        rows.notes[impl] = f"{WHAT[name]} ({_version(name)})"
    return rows


def _version(name: str) -> str:
    if name in ("openvino", "int8"):
        import openvino

        return f"OpenVINO {openvino.__version__.split('-')[0]}"  # "2026.4.1-22982-<commit>-releases/..."
    return f"torch {torch.__version__}"

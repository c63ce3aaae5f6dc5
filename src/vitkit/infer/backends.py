"""Which runtime runs a bf16 :class:`~vitkit.infer.Predictor` on the CPU: the hand-written walk
(:mod:`vitkit.infer.engine`, "eager"), ``torch.compile`` of the model's own forward (inductor with
freezing, "compile"), or OpenVINO's CPU plugin on the model's own forward converted once
("openvino", the optional extra ``vitkit[openvino]``), chosen by measurement on the machine.

Why measure: no runtime is fastest on every CPU. On an Intel Xeon with AMX, inductor's frozen
graph ran ViT-S/16 batch 8 at 1.10x the walk and OpenVINO at 1.06x (issue 21); on the project's
AMD EPYC (AVX-512-BF16, no AMX) the figures are in BENCHMARKS.md (``benchmarks/bf16_runtimes.py``).

``backend="auto"`` (the default for bf16): a shape (the input's, and the text mask's) runs the walk
until the walk has spent :data:`AUTO_AFTER_S` seconds on it, so a one-off call never pays a build
(inductor took tens of seconds per model and shape on 2 cores); then each available runtime is
built, timed against the walk in turns on that call's input, and the fastest (by at least
:data:`MARGIN`) runs that shape from then on. The choice, the speeds and the build times go to
``Predictor.notes``. What was measured and built is kept per model (:func:`chooser_for`: the same
weights, the same output), so build time is paid once per model and shape, never per call, also
by callers that build a Predictor per call (features, zero-shot). A forced backend ("compile" / "openvino")
that cannot run here (not installed, no C++ compiler, a failed build) falls back to the walk with a
note.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import statistics
import time
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger("vitkit.infer")

BACKENDS = ("auto", "eager", "compile", "openvino")
# "auto" measures a shape once the walk has spent this long on it: a stream of batches, where a
# build that takes seconds to minutes (inductor on 2 cores) can pay; a one-off call never builds
AUTO_AFTER_S = 10.0
MARGIN = 1.03  # a runtime replaces the walk only when this much faster (timing noise on a shared CPU)
TIMED = 3  # timed forwards per candidate; the median decides

Run = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (x, attention_mask) -> output
Trim = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]
Stages = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (model, x, mask) -> output


def unavailable(name: str, text: bool) -> str:
    """'' when backend ``name`` can run here, else why not."""
    if text and name == "compile":
        # CLIP's tower trims its ids after the batch's last end-of-text token, so the length changes
        # per batch: inductor recompiled per length (10 s each for a 2-block tower) and hit dynamo's
        # limit of 8 recompiles. OpenVINO's converted graph takes any length (tested).
        return "inductor recompiles a text tower per length (its ids are trimmed per batch)"
    if name == "openvino" and importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install 'vitkit[openvino]')"
    if name == "compile" and not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "torch.compile's CPU backend needs a C++ compiler, none found"
    return ""


class _Forward(nn.Module):
    """The model's own forward for the Predictor's output, as a module: what OpenVINO converts
    (a text tower's trim is skipped while tracing: the runtime trims before each call)."""

    def __init__(self, net: nn.Module, stages: Stages) -> None:
        super().__init__()
        self.net, self.stages = net, stages

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.stages(self.net, x, mask)


def build(name: str, net: nn.Module, stages: Stages, x: torch.Tensor, mask: torch.Tensor | None = None,
          trim: Trim | None = None) -> Run:
    """Backend ``name`` over ``stages(net, x, attention_mask)`` (the model's own forward for the
    Predictor's output) on the bf16 copy ``net``, for inputs like ``x`` (and ``mask``). ``trim``: a
    text tower's cut of its ids, applied before each call of a converted graph. Raises when the
    runtime cannot take the model."""
    if name == "compile":
        # freezing: the weights become constants and the Linear layers are oneDNN-packed once (what
        # the walk does by hand); dynamic=False: one graph per shape, as the Chooser keys its choices
        fn = torch.compile(lambda x, mask: stages(net, x, mask), backend="inductor", dynamic=False,
                           options={"freezing": True})
        return fn
    if name == "openvino":
        import openvino as ov

        # converted from the fp32 values of the bf16 weights (exact); OpenVINO computes in bf16 itself
        module = _Forward(copy.deepcopy(net).float(), stages).eval()
        feed = (lambda x, mask: (x,) if mask is None else (x, mask)) if not x.is_floating_point() else \
            (lambda x, mask: (x.float(),))
        with torch.no_grad(), warnings.catch_warnings():
            # the trace takes the image size as fixed (the Chooser converts once per size)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph = ov.convert_model(module, example_input=feed(x, mask))
        compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})

        def run(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            if trim is not None:
                x, mask = trim(x, mask)
            return torch.from_numpy(compiled(dict(enumerate(t.numpy() for t in feed(x, mask))))[0])

        return run
    raise ValueError(f"unknown backend {name!r}")


def _timed(runs: dict[str, Run], x: torch.Tensor, mask: torch.Tensor | None) -> dict[str, float]:
    """Median seconds of one forward per runtime, over :data:`TIMED` rounds that run each in turn
    (machine drift hits all alike), each turn repeating a fast forward for at least 50 ms, after
    two warm-up calls each (a runtime's first calls set up its memory)."""
    ts: dict[str, list[float]] = {n: [] for n in runs}
    for n in runs:
        runs[n](x, mask)
        runs[n](x, mask)
    for _ in range(TIMED):
        for n, run in runs.items():
            k, t0 = 0, time.perf_counter()
            while not k or time.perf_counter() - t0 < 0.05:
                run(x, mask)
                k += 1
            ts[n].append((time.perf_counter() - t0) / k)
    return {n: statistics.median(t) for n, t in ts.items()}


# model -> {(backend, output, weights): Chooser}; weak: a dropped model drops its entries
_CHOOSERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chooser_for(model: nn.Module, backend: str, output: str, make: Callable[[], Chooser],
                notes: list[str]) -> Chooser:
    """The :class:`Chooser` of ``model``'s ``output`` under ``backend``, made by ``make`` the first
    time and kept while the model's weights are as they are now (each parameter's identity and
    version, the rule zero-shot's class embeddings follow), so a Predictor built again on the same
    model keeps its measurements and built runtimes; a changed model gets a new one. Its choices so
    far, and those to come, are written to ``notes`` (the new Predictor's)."""
    weights = tuple((id(p), p._version) for p in model.parameters())
    per = _CHOOSERS.setdefault(model, {})
    key = (backend, output, weights)
    if key not in per:
        for stale in [k for k in per if k[2] != weights]:
            del per[stale]
        per[key] = make()
    ch = per[key]
    notes.extend(ch.said)
    ch.notes = notes
    return ch


class Chooser:
    """Per input shape, which runtime runs a bf16 Predictor (module docstring). ``eager`` is the
    walk; ``stages`` the model's own forward for the Predictor's output, run on the bf16 copy
    ``net``. Neither may hold the original model (the key of :func:`chooser_for`'s weak cache)."""

    def __init__(self, backend: str, net: nn.Module, stages: Stages, eager: Run, text: bool,
                 trim: Trim | None = None) -> None:
        self.backend, self.net, self.stages, self.eager, self.text = backend, net, stages, eager, text
        self.trim = trim  # a text tower's cut of its ids (what its forward does), None for images
        self.said: list[str] = []  # every choice made (a fallback is also logged)
        self.notes: list[str] = []  # the latest Predictor's notes, which hear each choice too
        self.runs: dict[tuple, Run] = {}  # shape -> the chosen runtime
        self.spent: dict[tuple, float] = {}  # shape -> seconds the walk ran it while undecided
        # (backend, input shape less the batch, no mask) -> its runtime: inductor keeps a graph per
        # shape itself; OpenVINO's converted graph takes any batch (traced: one per image size)
        self.built: dict[tuple, Run] = {}
        self.chosen: dict[tuple, str] = {}  # shape -> backend name
        # auto with no other runtime here (none installed, a text tower): the walk, nothing to time
        self.candidates = [n for n in BACKENDS[2:] if not unavailable(n, text)] if backend == "auto" else [backend]

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        key = (tuple(x.shape), None if mask is None else tuple(mask.shape))
        run = self.runs.get(key)
        if run is None:
            if not self.candidates:
                return self.eager(x, mask)
            if self.backend == "auto" and self.spent.get(key, 0.0) < AUTO_AFTER_S:
                t0 = time.perf_counter()
                out = self.eager(x, mask)
                self.spent[key] = self.spent.get(key, 0.0) + time.perf_counter() - t0
                return out
            run = self.runs[key] = self._choose(key, x, mask)
        return run(x, mask)

    def _get(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[Run | None, float, str]:
        """(runtime, seconds its first call on this shape took: the build, '') or (None, 0, why not)."""
        why = unavailable(name, self.text)
        if why:
            return None, 0.0, why
        t0 = time.perf_counter()
        try:
            where = (name, x.shape[1:], mask is None)
            run = self.built.get(where) or build(name, self.net, self.stages, x, mask, self.trim)
            run(x, mask)  # inductor builds (a graph for this shape) on the first call
        except Exception as e:  # a runtime that cannot take this model: the walk runs it
            return None, 0.0, f"{name} failed to build ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        self.built[where] = run
        return run, time.perf_counter() - t0, ""

    def _say(self, msg: str) -> None:
        self.said.append(msg)
        self.notes.append(msg)

    def _choose(self, key: tuple, x: torch.Tensor, mask: torch.Tensor | None) -> Run:
        shape = "x".join(map(str, key[0]))
        if self.backend != "auto":
            run, secs, why = self._get(self.backend, x, mask)
            if run is None:
                msg = f"bf16 backend {self.backend!r} unavailable ({why}): running the hand-written walk"
                self._say(msg)
                log.warning("Predictor: %s", msg)
                self.chosen[key] = "eager"
                return self.eager
            self.chosen[key] = self.backend
            self._say(f"bf16 backend for input {shape}: {self.backend} (asked for; built in {secs:.1f} s)")
            return run
        runs, said = {"eager": self.eager}, []
        for name in self.candidates:
            run, secs, why = self._get(name, x, mask)
            if run is None:
                said.append(why)
            else:
                runs[name] = run
                said.append(f"{name} built in {secs:.1f} s")
        t = _timed(runs, x, mask)
        best = min(t, key=t.get)
        if t[best] * MARGIN > t["eager"]:
            best = "eager"
        speed = ", ".join(f"{n} {t['eager'] / s:.2f}x" for n, s in t.items() if n != "eager")
        self.chosen[key] = best
        msg = (f"bf16 backend for input {shape}: {best}, measured against the walk ({speed or 'nothing else ran'}; "
               f"{'; '.join(said)})")
        self._say(msg)
        log.info("Predictor: %s", msg)
        return runs[best]

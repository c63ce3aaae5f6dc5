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

Each choice "auto" measures is also written to a small JSON file on disk (:func:`cache_path`: under
``$VITKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitkit``, else ``~/.cache/vitkit``), keyed by what
decides it: the CPU (:func:`vitkit.cpu.describe`), torch's threads, the torch and OpenVINO versions,
the model's architecture (its config, not its weights), the output and the input shape. A later
process starts that shape on the measured winner at its first call, without the walk's wait or the
timing, and says so (``... (chosen by measurement on <cpu> at <date>, cached in <path>)``). A file
that cannot be read is ignored and rewritten; ``VITKIT_BACKEND_CACHE=off`` neither reads nor writes
it; :func:`clear_cache` (or deleting the file) forgets every choice.
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
from pathlib import Path

import torch
from torch import nn

from .. import cpu, measured

log = logging.getLogger("vitkit.infer")

BACKENDS = ("auto", "eager", "compile", "openvino")
# "auto" measures a shape once the walk has spent this long on it: a stream of batches, where a
# build that takes seconds to minutes (inductor on 2 cores) can pay; a one-off call never builds
AUTO_AFTER_S = 10.0
MARGIN = 1.03  # a runtime replaces the walk only when this much faster (timing noise on a shared CPU)
TIMED = 3  # timed forwards per candidate; the median decides
CACHE_FILE = "bf16_backends.json"
CACHE_ENV = measured.ENV  # "off": the disk cache of choices is neither read nor written

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


def openvino_graph(net: nn.Module, stages: Stages, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
    """(OpenVINO's graph of ``stages(net, x, mask)``, feed: (x, mask) -> the graph's inputs). Converted
    from the fp32 values of ``net``'s weights (exact for a bf16 copy); the runtime picks its own
    precision when it compiles. Also the graph that :mod:`vitkit.infer.int8` quantizes."""
    import openvino as ov

    module = _Forward(copy.deepcopy(net).float(), stages).eval()
    feed = (lambda x, mask: (x,) if mask is None else (x, mask)) if not x.is_floating_point() else \
        (lambda x, mask: (x.float(),))
    with torch.no_grad(), warnings.catch_warnings():
        # the trace takes the image size as fixed (the Chooser converts once per size)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph = ov.convert_model(module, example_input=feed(x, mask))
    return graph, feed


def openvino_compile(graph, precision: str):
    """OpenVINO's CPU plugin on ``graph``: what is not int8 in ``precision`` ("bf16" | "f32"), one
    stream for the lowest latency of a call, torch's thread count."""
    import openvino as ov

    return ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                                                  "INFERENCE_NUM_THREADS": torch.get_num_threads()})


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
        graph, feed = openvino_graph(net, stages, x, mask)
        compiled = openvino_compile(graph, "bf16")

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


def cache_path() -> Path:
    """The disk cache of "auto"'s choices (:mod:`vitkit.measured`): the file :data:`CACHE_FILE` under
    ``$VITKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitkit``, else ``~/.cache/vitkit``."""
    return measured.path(CACHE_FILE)


def clear_cache() -> None:
    """Forget every cached choice (the next "auto" Predictor measures again)."""
    cache_path().unlink(missing_ok=True)


def weights_key(module: nn.Module) -> tuple:
    """Each parameter's identity and version: it changes when a weight is replaced or updated in place
    (an optimizer step, ``load_state_dict``). What a copy or a build made from the weights is kept under."""
    return tuple((id(p), p._version) for p in module.parameters())


def kept(cache: weakref.WeakKeyDictionary, model: nn.Module, key: tuple, make: Callable[[], object]):
    """``make()``'s result for ``model`` and ``key``, made the first time and kept in ``cache`` while the
    model's weights are as they are now (:func:`weights_key`); what was kept for its earlier weights is
    dropped. ``cache`` is weak: a dropped model drops its entries."""
    weights = weights_key(model)
    per = cache.setdefault(model, {})
    full = (weights, *key)
    if full not in per:
        for stale in [k for k in per if k[0] != weights]:
            del per[stale]
        per[full] = make()
    return per[full]


# model -> {(weights, backend, output): Chooser}
_CHOOSERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chooser_for(model: nn.Module, backend: str, output: str, make: Callable[[], Chooser],
                notes: list[str]) -> Chooser:
    """The :class:`Chooser` of ``model``'s ``output`` under ``backend``, made by ``make`` the first
    time and kept while the model's weights are as they are now (:func:`kept`), so a Predictor built
    again on the same model keeps its measurements and built runtimes; a changed model gets a new
    one. Its choices so far, and those to come, are written to ``notes`` (the new Predictor's)."""

    def made() -> Chooser:
        ch = make()
        ch.identity = {"architecture": measured.architecture(model), "output": output}
        return ch

    ch = kept(_CHOOSERS, model, (backend, output), made)
    notes.extend(ch.said)
    ch.notes = notes
    return ch


def cached_chooser(model: nn.Module, backend: str, output: str, notes: list[str]) -> Chooser | None:
    """The :class:`Chooser` :func:`chooser_for` keeps for ``model`` as its weights are now, or None:
    a Predictor built again on the same model takes its bf16 copy and walk (checked when first
    built) instead of copying and checking again, a cost each zero-shot or features call paid."""
    ch = _CHOOSERS.get(model, {}).get((weights_key(model), backend, output))
    if ch is None or ch.plan is None or ch.net.training != model.training:
        return None
    notes.extend(ch.said)
    ch.notes = notes
    return ch


class Chooser:
    """Per input shape, which runtime runs a bf16 Predictor (module docstring). ``eager`` is the
    walk; ``stages`` the model's own forward for the Predictor's output, run on the bf16 copy
    ``net``. Neither may hold the original model (the key of :func:`chooser_for`'s weak cache)."""

    def __init__(self, backend: str, net: nn.Module, stages: Stages, eager: Run, text: bool,
                 trim: Trim | None = None, plan=None) -> None:
        self.backend, self.net, self.stages, self.eager, self.text = backend, net, stages, eager, text
        self.trim = trim  # a text tower's cut of its ids (what its forward does), None for images
        self.plan = plan  # the walk's engine.Plan over ``net`` (a Predictor built again reuses it)
        # what, besides the input shape, keys the disk cache (chooser_for: architecture, output)
        self.identity: dict = {}
        self.looked_up: set[tuple] = set()  # shapes whose disk-cache entry was read
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
            if self.backend == "auto" and key not in self.looked_up:  # measured by an earlier process?
                self.looked_up.add(key)
                run = self._from_cache(key, x, mask)
                if run is not None:
                    self.runs[key] = run
                    return run(x, mask)
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

    def _cache_key(self, key: tuple) -> tuple[str, dict]:
        """(the disk cache's key of input shape ``key``, the fields it hashes: module docstring)."""
        fields = {**measured.machine(), **self.identity, "dtype": "bf16", "input": list(key[0]),
                  "mask": None if key[1] is None else list(key[1])}
        return measured.key(fields), fields

    def _from_cache(self, key: tuple, x: torch.Tensor, mask: torch.Tensor | None) -> Run | None:
        """The runtime an earlier measurement chose for this shape (disk cache), built; None when
        nothing usable is cached (not cached, that runtime unavailable or failing now: measure)."""
        if not measured.enabled() or not self.identity:
            return None
        entry = measured.read(CACHE_FILE).get(self._cache_key(key)[0], {})
        name = entry.get("backend")
        if name != "eager" and name not in self.candidates:
            return None
        run, secs, _ = (self.eager, 0.0, "") if name == "eager" else self._get(name, x, mask)
        if run is None:
            return None
        self.chosen[key] = name
        built = "" if name == "eager" else f"; built in {secs:.1f} s"
        self._say(f"bf16 backend for input {'x'.join(map(str, key[0]))}: {name} (chosen by measurement on "
                  f"{cpu.describe()} at {entry.get('measured', '?')}, cached in {cache_path()}{built})")
        return run

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
        if measured.enabled() and self.identity:
            name, fields = self._cache_key(key)
            measured.write(CACHE_FILE, name, {**fields, "backend": best, "speeds": speed})
        return runs[best]

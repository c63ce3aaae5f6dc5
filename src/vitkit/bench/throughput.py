"""Throughput benchmark: vitkit against timm, same architecture, same run, as a ratio.

Method: both models get identical weights (timm's state dict loads into vitkit one to one), are
warmed up, then timed in *interleaved* rounds (vitkit, timm, timm, vitkit, ...) so that drift in
machine load hits both alike. Reported: the median over rounds of images/s (inference) or of
step time (forward + cross-entropy + backward + AdamW step), and the ratio vitkit/timm as the
median of the per-round ratios t_timm / t_vitkit.

The training step is each library's own: AdamW (lr 1e-4, weight decay 0.05, none on norms and
biases) as its factory builds it, ``vitkit.train.optim.build_optimizer`` (fused kernel) against
``timm.optim.create_optimizer_v2(model, "adamw")``; ``same_optimizer=True`` gives both a plain
``torch.optim.AdamW`` instead, to compare the models alone.
On CUDA, MFU = achieved FLOP/s / the device's peak dense FLOP/s for the dtype. FLOPs are the
standard full-model count (``count_flops``, x3 for a training step), the same for both libraries;
vitkit's class-token-only last block executes ~7% fewer at depth 12, so its TFLOP/s and MFU are
effective rates (model FLOPs per second), as MFU is defined.

~420 lines on purpose: every impl's timed step (vitkit, timm, the Predictor's paths, ONNX Runtime
int8) beside the one interleaved timer, so that what is compared is read in one place.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import cpu
from ..config import ViTConfig
from ..errors import ConfigError
from .flops import count_flops, train_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Peak dense tensor-core FLOP/s by (device-name fragment, dtype); fp32 uses TF32 peaks.
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 494e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 494e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 156e12,
    ("L4", "bf16"): 121e12, ("L4", "fp16"): 121e12, ("L4", "fp32"): 60e12,
}


@dataclass
class BenchResult:
    name: str
    impl: str
    batch_size: int
    dtype: str
    device: str
    mode: str  # "inference" | "train"
    compiled: bool
    times_s: list[float] = field(repr=False)
    median_s: float | None = 0.0  # None: a row that did not run (``skipped``)
    images_per_s: float | None = 0.0
    tflops: float | None = 0.0
    mfu: float | None = None
    ratio_vs_timm: float | None = None  # median over rounds of t_timm / t_impl (paired, same round)
    ratio_iqr: tuple[float, float] | None = None  # quartiles of the per-round ratios: the noise
    optimizer: str | None = None  # train mode: which AdamW implementation stepped
    page_faults: float | None = None  # median minor page faults per step (fresh memory touched)
    note: str | None = None  # what ran, where the impl name does not say it all (Predictor path, ORT)
    machine: str = ""  # the processor the row ran on: CPU model and ISA flags (vitkit.cpu), or the GPU
    setup_s: float | None = None  # a runtime's one-off build before timing (compile, convert), not in median_s
    skipped: str | None = None  # why this row did not run here (not installed, no C++ compiler, ...)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("times_s")
        return d


def peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (frag, dt), peak in PEAK_FLOPS.items():
        if frag in name and dt == dtype:
            return peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BENCH_LR, BENCH_WD = 1e-4, 0.05


def bench_optimizer(impl: str, model: nn.Module, same_optimizer: bool = False) -> torch.optim.Optimizer:
    """The AdamW a training step of ``impl`` ("vitkit" | "timm") uses: its library's factory, or
    a plain ``torch.optim.AdamW`` for both with ``same_optimizer``."""
    if same_optimizer:
        return torch.optim.AdamW(model.parameters(), lr=BENCH_LR, weight_decay=BENCH_WD)
    if impl == "timm":
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(model, "adamw", lr=BENCH_LR, weight_decay=BENCH_WD)
    from types import SimpleNamespace

    from ..train.optim import build_optimizer

    cfg = SimpleNamespace(lr=BENCH_LR, weight_decay=BENCH_WD, betas=(0.9, 0.999), layer_decay=1.0)
    return build_optimizer(model, cfg)


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "torch default"
    return f"{type(opt).__name__} ({kind})"


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool, dtype: str,
              device: torch.device, opt: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One benchmark step as a closure: inference forward, or forward+backward+``opt`` step
    (default: a plain AdamW)."""
    amp = (torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32"
           else contextlib.nullcontext())
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), amp:
                model(x)

        return infer
    model.train()
    if opt is None:
        opt = torch.optim.AdamW(model.parameters(), lr=BENCH_LR, weight_decay=BENCH_WD)
    scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return step


def minor_faults() -> int | None:
    """Minor page faults of this process so far (each = the kernel mapping and zeroing a fresh
    4 KiB page); None where the platform does not count them."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, runs: int,
               progress: bool = False) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Warm up each step, then time them in interleaved rounds (order alternates per round).
    Returns seconds per step and minor page faults per step (empty where not counted)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    rounds = range(runs)
    if progress:
        from ..progress import progress_bar

        rounds = progress_bar(rounds, desc="timing", unit="round", leave=False)
    for r in rounds:
        for n in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            f0 = minor_faults()
            t0 = time.perf_counter()
            steps[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
            if f0 is not None:
                faults[n].append(minor_faults() - f0)
    return times, faults


def timm_equivalent(config: ViTConfig):
    """The same architecture built by timm, or None when timm is absent or cannot express it."""
    try:
        import timm  # noqa: F401
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    c = config
    if (c.pos_embed != "learned" or not c.norm_first or c.head_hidden_dim or c.patch_embed != "conv"
            or c.task != "classification" or c.act not in ("gelu", "gelu_tanh")):
        return None
    act = None
    if c.act == "gelu_tanh":
        from functools import partial

        act = partial(nn.GELU, approximate="tanh")
    kw = dict(img_size=c.image_hw, patch_size=c.patch_hw, in_chans=c.in_channels, num_classes=c.num_classes,
              embed_dim=c.dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.hidden_dim / c.dim,
              qkv_bias=c.qkv_bias, class_token=c.class_token, reg_tokens=c.num_registers,
              no_embed_class=not c.pos_embed_prefix, global_pool="token" if c.pooling == "cls" else "avg",
              fc_norm=c.fc_norm, init_values=c.layer_scale, drop_path_rate=c.drop_path,
              drop_rate=c.head_dropout, proj_drop_rate=c.dropout, attn_drop_rate=c.attn_dropout,
              pos_drop_rate=c.dropout)
    if act is not None:
        kw["act_layer"] = act
    if c.pooling == "mean" and not c.fc_norm:
        return None  # timm's avg pooling always uses its own norm layout
    from functools import partial

    kw["norm_layer"] = partial(nn.LayerNorm, eps=c.norm_eps)
    return VisionTransformer(**kw)


def predictor_steps(model: nn.Module, x: torch.Tensor, dtypes: tuple[str, ...], compile: bool = False) -> tuple[
        dict[str, Callable[[], None]], dict[str, str]]:
    """One inference step per ``vitkit.infer.Predictor`` dtype ("vitkit-fp32", ...), and a note
    per step saying which path runs (a CPU without native bf16 runs fp32: the note says so).
    bf16 runs the hand-written walk (``backend="eager"``): the default "auto" would switch runtime
    mid-benchmark once the walk has run 10 s; the runtimes it chooses from have rows of their own
    (``runtimes=``, :mod:`vitkit.bench.runtimes`)."""
    from ..infer import Predictor

    steps, notes = {}, {}
    for dt in dtypes:
        p = Predictor(model, dt, compile=compile, backend="eager")
        steps[f"vitkit-{dt}"] = functools.partial(p, x)
        notes[f"vitkit-{dt}"] = f"Predictor {p.dtype} ({p.path})" + (f": {'; '.join(p.notes)}" if p.notes else "")
    return steps, notes


def ort_int8_step(model: nn.Module, x: torch.Tensor, workdir: str) -> tuple[Callable[[], None], str]:
    """ONNX Runtime's dynamic int8 quantization of the exported model (the peer of the int8
    Predictor): export to ONNX, ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
    per-channel), one CPU session with torch's thread count."""
    from pathlib import Path

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ConfigError("the ONNX Runtime comparison needs onnxruntime: pip install 'vitkit[onnx]'") from e
    from ..interop.graph import export_onnx

    fp32 = export_onnx(model, Path(workdir) / "model.onnx")
    q = Path(workdir) / "model.int8.onnx"
    quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8, per_channel=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xn = x.cpu().numpy()
    return (lambda: sess.run(None, {name: xn})), f"onnxruntime {ort.__version__} quantize_dynamic QInt8 per-channel"


def run_benchmark(
    name: str | ViTConfig,
    batch_size: int = 8,
    dtype: str = "fp32",
    device: str = "cpu",
    train: bool = False,
    compile: bool = False,
    warmup: int = 3,
    runs: int = 10,
    compare_timm: bool = True,
    progress: bool = False,
    same_optimizer: bool = False,
    predictor: tuple[str, ...] = (),
    ort_int8: bool = False,
    runtimes: tuple[str, ...] = (),
    **overrides: Any,
) -> list[BenchResult]:
    """Time vitkit (and timm, when installed) on one configuration; returns one result per impl.
    Training steps use each library's AdamW factory unless ``same_optimizer`` (module docstring).

    fp32 inference on the CPU can add ``vitkit.infer.Predictor`` paths (``predictor=("fp32",
    "bf16", "int8")``: impls "vitkit-fp32", ...) and ONNX Runtime's dynamic int8 quantization of
    the exported model (``ort_int8``: impl "ort-int8"), timed in the same interleaved rounds;
    every impl's ratio is against timm (fp32 eager there). CUDA inference with "bf16" in
    ``predictor`` adds ``Predictor(model, "bf16", compile=compile)`` ("vitkit-bf16": bf16 weights,
    no autocast) and its peer "timm-bf16" (timm's model cast to bf16); their ratios are against
    the "timm" row (autocast at ``dtype``). Other modes ignore both.

    ``runtimes`` (fp32 CPU inference): ``("compile", "openvino")`` adds the bf16 runtimes' rows
    ("compile-bf16", "openvino-bf16", :mod:`vitkit.bench.runtimes`) to the same rounds, their
    build time apart in ``setup_s``; one that cannot run here gets a row saying why (``skipped``)."""
    dev = _check_args(dtype, batch_size, runs, warmup, device)
    models = _models(name, compare_timm, overrides)
    model, c = models["vitkit"], models["vitkit"].config
    x = torch.randn(batch_size, c.in_channels, *c.image_hw, device=dev)
    y = torch.randint(0, max(c.num_classes, 1), (batch_size,), device=dev)
    steps, opt_names, notes = {}, {}, {}
    for impl, m in models.items():
        m = m.to(dev)
        opt = None
        if train:  # built on the plain module: parameter names without torch.compile's prefix
            opt = bench_optimizer(impl, m, same_optimizer)
            opt_names[impl] = describe_optimizer(opt)
        if compile:
            m = torch.compile(m)
        steps[impl] = make_step(m, x, y, train, dtype, dev, opt=opt)
    # The Predictor picks its own precision: on the CPU its rows (and ORT's) go with fp32 eager
    # inference, where timm's row is fp32 eager, the reference the goals name. On CUDA the
    # Predictor's bf16 (a bf16 copy of the weights, no autocast) runs beside autocast, eager or
    # compiled as asked, with its peer: timm's model cast to bf16 the same way ("timm-bf16").
    extra = not train and not compile and dev.type == "cpu" and dtype == "fp32"
    if predictor and extra:
        _add(steps, notes, predictor_steps(model, x, tuple(predictor)))
    rt = None
    if runtimes and extra:
        from .runtimes import runtime_rows

        rt = runtime_rows(model, x, tuple(runtimes))
        _add(steps, notes, (rt.steps, rt.notes))
    if not train and dev.type == "cuda" and "bf16" in predictor:
        _add(steps, notes, predictor_steps(model, x, ("bf16",), compile=compile))
        if "timm" in models:
            _add(steps, notes, _timm_bf16_step(models["timm"], x, compile))
    with tempfile.TemporaryDirectory(prefix="vitkit-bench-") if ort_int8 and extra else \
            contextlib.nullcontext() as tmp:
        if tmp is not None:
            steps["ort-int8"], notes["ort-int8"] = ort_int8_step(model, x, tmp)
        times, faults = time_steps(steps, dev, warmup, runs, progress=progress)
    results = _results(c, times, faults, batch_size=batch_size, dtype=dtype, dev=dev, train=train,
                       compile=compile, opt_names=opt_names, notes=notes)
    return rt.finish(results) if rt is not None else results


def _results(c: ViTConfig, times: dict[str, list[float]], faults: dict[str, list[float]], *, batch_size: int,
             dtype: str, dev: torch.device, train: bool, compile: bool, opt_names: dict[str, str],
             notes: dict[str, str]) -> list[BenchResult]:
    """One row per impl: median time, images/s, achieved TFLOP/s and MFU, the paired ratio to timm."""
    flops_per_image = train_flops(c) if train else count_flops(c)["flops"]
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu.describe())
    results = []
    for impl, ts in times.items():
        med = statistics.median(ts)
        ips = batch_size / med
        achieved = flops_per_image * ips
        row_dtype = impl.split("-")[1] if "-" in impl else dtype
        peak = peak_flops(dev, row_dtype) if row_dtype in DTYPES else None
        ratio, iqr = _paired_ratio(times, impl)
        results.append(BenchResult(
            name=c.name or "custom", impl=impl, batch_size=batch_size, dtype=row_dtype, device=dev.type,
            mode="train" if train else "inference", compiled=compile, times_s=ts, median_s=med,
            images_per_s=ips, tflops=achieved / 1e12, mfu=(achieved / peak) if peak else None,
            ratio_vs_timm=ratio, ratio_iqr=iqr, optimizer=opt_names.get(impl),
            page_faults=statistics.median(faults[impl]) if faults.get(impl) else None, note=notes.get(impl),
            machine=machine))
    return results


def _check_args(dtype: str, batch_size: int, runs: int, warmup: int, device: str) -> torch.device:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size <= 0 or runs <= 0 or warmup < 0:
        raise ConfigError("batch_size and runs must be positive and warmup >= 0")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return dev


def _models(name: str | ViTConfig, compare_timm: bool, overrides: dict[str, Any]) -> dict[str, nn.Module]:
    """{"vitkit": the model (seed 0), "timm": its timm equivalent with the same weights, where there is one}."""
    from .. import create_model

    torch.manual_seed(0)
    model = create_model(name, **overrides)
    models: dict[str, nn.Module] = {"vitkit": model}
    if compare_timm:
        ref = timm_equivalent(model.config)
        if ref is not None:
            ref.load_state_dict(model.state_dict())  # identical weights (names match by design)
            models["timm"] = ref
    return models


def _add(steps: dict[str, Callable], notes: dict[str, str], more: tuple[dict[str, Callable], dict[str, str]]) -> None:
    steps.update(more[0])
    notes.update(more[1])


def _timm_bf16_step(ref: nn.Module, x: torch.Tensor, compile: bool) -> tuple[dict[str, Callable], dict[str, str]]:
    """The peer of the Predictor's bf16 on CUDA: timm's model cast to bf16 the same way."""
    ref16 = copy.deepcopy(ref).to(torch.bfloat16).eval()
    fn = torch.compile(ref16) if compile else ref16
    x16 = x.to(torch.bfloat16)

    def timm_bf16() -> None:
        with torch.inference_mode():
            fn(x16)

    return {"timm-bf16": timm_bf16}, {"timm-bf16": "timm's model cast to bf16 (weights and activations), "
                                      + ("torch.compile" if compile else "eager")}


def _paired_ratio(times: dict[str, list[float]], impl: str) -> tuple[float | None, tuple[float, float] | None]:
    """timm's time over ``impl``'s, the median over rounds and its interquartile range. Paired: each
    round times both impls back to back, so a per-round ratio cancels the machine's drift (throughput
    on a shared VM moves +-20% between rounds; the ratio much less)."""
    if "timm" not in times or impl == "timm":
        return None, None
    per_round = [t / v for t, v in zip(times["timm"], times[impl])]
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 4 else None
    return statistics.median(per_round), (q[0], q[2]) if q else None

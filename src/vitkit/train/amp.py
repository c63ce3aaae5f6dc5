"""``--amp auto``: bf16 autocast in the training step where it measures faster on this CPU, else fp32.

    choose_amp            the run's autocast ("off" | "bf16" | "fp16") and the log line saying why
    measure_bf16_speedup  fp32 step time / bf16 autocast step time of the model at hand

On CUDA ``auto`` keeps fp32 (TF32 matmuls), as before ``auto`` existed. On the CPU bf16 pays only
where the CPU multiplies bf16 natively (``vitkit.cpu.bf16_native``: AVX-512-BF16, AMX-BF16; oneDNN
emulates it elsewhere, slower than fp32) and the matmuls are wide enough to outweigh autocast's casts.
Measured on the 2-core AMD EPYC (AVX-512-BF16, no AMX; forward + backward, 1 thread, shared machine):
the digits model (dim 32, 16 tokens, batch 64, ~0.2 GFLOP a step) 0.87x, dim 64 / 64 tokens 0.61x,
dim 128 / 64 tokens 1.15x, dim 192 / 64 tokens 1.31x, ViT-S/16 1.73x the fp32 step; on an Intel Xeon
with AMX, ViT-S/16 2.5x (issue 21). So the choice is a measurement of this model on this CPU: a few
forward + backward steps (no optimizer) at the run's input shape, fp32 and bf16 in paired rounds after
a warm-up of each, the median ratio, about 2 s; bf16 only at :data:`MARGIN` or more. A step under
:data:`MIN_STEP_GFLOP` is not measured (the digits run: its matmuls are too small for bf16 to pay).

The measured ratio is kept on disk (:mod:`vitkit.measured`, file :data:`CACHE_FILE`), keyed by the CPU,
torch's threads and version, the model's architecture and the step's input shape: a later run of the same
model here reads it instead of measuring, so the same command makes the same choice whatever the load was.
Measured again per run, a ViT-Ti/16 at 64 px on the shared 2-core EPYC gave 0.59x to 1.58x, and runs of one
recipe trained in fp32 or bf16 by chance. ``VITKIT_BACKEND_CACHE=off`` measures every run.

The choice is saved with the run's state (``train_state.pt``, key ``amp``) and in summary.json;
``--resume`` takes it from there and measures nothing (a resumed run stays bit-exact). ``config.yaml``
keeps ``auto``: reused as a recipe on another CPU, it measures there.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .. import cpu, measured
from ..bench.flops import train_flops
from ..distributed import DistInfo, all_reduce_max

MARGIN = 1.1  # bf16 must run the step this much faster: below it, the measurement's noise decides
MIN_STEP_GFLOP = 1.0  # forward + backward of one step; below, autocast's casts outweigh the matmuls
BUDGET_S = 2.0  # measuring stops after this (at least MIN_ROUNDS paired rounds)
ROUND_S = 0.2  # the measured batch is cut so one fp32 step takes about this long
MIN_ROUNDS, MAX_ROUNDS = 2, 5
CACHE_FILE = "train_amp.json"  # measured ratios (vitkit.measured)


@dataclass(frozen=True)
class AmpChoice:
    amp: str  # what the step runs: "off" (fp32) | "bf16" | "fp16" autocast
    note: str | None  # the log line saying what was chosen and why; None for an explicit --amp


def choose_amp(requested: str, model: torch.nn.Module, device: torch.device, micro_batch: int,
               dist: DistInfo | None = None, probe: bool = False) -> AmpChoice:
    """The step's autocast for ``--amp requested``: anything but ``auto`` as given; ``auto`` as the
    module docstring says, measuring ``model`` (the trainable model, unwrapped) at ``micro_batch``
    images of its own input size. Under torchrun every rank measures and the slowest ratio decides,
    so all ranks run the same step."""
    if requested != "auto":
        return AmpChoice(requested, None)
    if device.type != "cpu":
        return AmpChoice("off", f"amp: fp32 (--amp auto keeps fp32 on {device.type}; --amp bf16 for autocast)")
    if probe:
        return AmpChoice("off", "amp: fp32 (a linear probe trains only the head, on cached features; --amp bf16 "
                                "forces autocast)")
    if not cpu.bf16_native():
        return AmpChoice("off", "amp: fp32 (this CPU has no native bf16 matmul, AVX-512-BF16 or AMX: bf16 would be "
                                "emulated; --amp bf16 forces it)")
    c = model.config
    gflop = train_flops(c) * micro_batch / 1e9
    if gflop < MIN_STEP_GFLOP:
        return AmpChoice("off", f"amp: fp32 (a step of this model is {gflop:.2g} GFLOP, too small for bf16 matmuls "
                                f"to pay; --amp bf16 forces it)")
    shape = (micro_batch, c.in_channels, *c.image_hw)
    ratio, how = cached_speedup(model, shape)
    if dist is not None and dist.enabled:  # the slowest rank's ratio: every rank runs the same step
        ratio = -float(all_reduce_max(torch.tensor([-ratio], dtype=torch.float64), dist)[0])
    if ratio >= MARGIN:
        return AmpChoice("bf16", f"amp: bf16 autocast ({ratio:.2f}x the fp32 step here, {how}; --amp off for fp32)")
    return AmpChoice("off", f"amp: fp32 (bf16 autocast {ratio:.2f}x the fp32 step here, {how}, under {MARGIN}x; "
                            f"--amp bf16 forces it)")


def cached_speedup(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[float, str]:
    """(:func:`measure_bf16_speedup` of ``model`` at ``shape``, how it was had): read from the disk cache
    where this CPU, thread count, torch and architecture measured it before, else measured and written."""
    fields = {**measured.machine(), "architecture": measured.architecture(model), "input": list(shape)}
    name = measured.key(fields)
    if measured.enabled():
        entry = measured.read(CACHE_FILE).get(name, {})
        if isinstance(entry.get("ratio"), (int, float)):
            return float(entry["ratio"]), (f"measured at {entry.get('measured', '?')} and cached in "
                                           f"{measured.path(CACHE_FILE)}")
    ratio = measure_bf16_speedup(model, shape)
    if measured.enabled():
        measured.write(CACHE_FILE, name, {**fields, "ratio": round(ratio, 4)})
    return ratio, "measured"


def amp_name(dtype: torch.dtype | None) -> str:
    """The ``--amp`` value of a step's autocast dtype (None: "off")."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")


def measure_bf16_speedup(model: torch.nn.Module, shape: tuple[int, ...], budget_s: float = BUDGET_S) -> float:
    """fp32 step time / bf16-autocast step time of ``model``'s forward + backward (no optimizer) on
    random inputs of ``shape`` (B, C, H, W), on the CPU, in training mode. B is cut so that one fp32
    step takes about :data:`ROUND_S`. The model's weights, gradients and mode and torch's global RNG
    are left as they were, so a measured run trains exactly as an unmeasured one."""
    was_training = model.training
    grads = [p.grad for p in model.parameters()]
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            x = torch.randn(1, *shape[1:])
            _step(model, x, False)  # warm-up: the first call's allocations would make the batch too small
            per_image = _step(model, x, False) / len(x)
            b = max(1, min(shape[0], int(ROUND_S / per_image)))
            if b != len(x):
                x = torch.randn(b, *shape[1:])
                _step(model, x, False)
            _step(model, x, True)  # warm-up: oneDNN builds its bf16 kernels
            ratios: list[float] = []
            begin = time.perf_counter()
            while len(ratios) < MIN_ROUNDS or (len(ratios) < MAX_ROUNDS and time.perf_counter() - begin < budget_s):
                order = (False, True) if len(ratios) % 2 == 0 else (True, False)  # alternate: drift cancels
                t = {bf16: _step(model, x, bf16) for bf16 in order}
                ratios.append(t[False] / t[True])
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
    return statistics.median(ratios)


def _step(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    outs = out if isinstance(out, (tuple, list)) else (out,)  # DeiT's distillation token: two heads
    sum(o.float().sum() for o in outs).backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0

"""Will the first step fit? An estimate of a training step's memory, made before it runs, and the
batch that fits what the machine has.

A run that does not fit is killed by the kernel's OOM killer with no message (issue 25: DINOv2 at
518 px, batch 64, killed at ~24 GB within a minute). So :func:`fit_batch` estimates

    fixed      params + grads + AdamW's two moments (+ the EMA copy): 4 (5) fp32 copies of the weights
    per image  the activations of a step: per block 10 D + 2 M values per token (autograd keeps
               ~6 D + 1 M of them, measured with saved_tensors_hooks: norm outputs, q k v, the attention
               output, the MLP's hidden; the rest is the backward's own gradients and the allocator's
               slack). No N^2 term: the fused attention kernels vitkit's forward calls (SDPA: flash on
               the CPU, flash / memory-efficient on CUDA) keep no attention matrix

against the memory available now (``psutil``; CUDA: the device's free memory), keeping
:data:`HEADROOM` of it for the loaders, the evaluation and the allocator. The batch is lowered to
what fits, with a message saying so; where even one image does not fit, a ConfigError names the
numbers and the options that change them.

Measured on the 2-core CPU (fp32, DINOv2-S/14; the growth of the peak RSS over one forward + backward
less the 88 MiB of gradients): 112 px, batch 32: 541 MiB measured, 666 MiB estimated; 224 px, batch 16:
1249 MiB, 1316 MiB. Meant as an upper bound: a step the OOM killer ends loses the run, a batch a little
smaller than possible does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError

HEADROOM = 0.75  # share of the available memory a training step may plan to use
GiB = 1 << 30
MiB = 1 << 20


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: free CUDA memory, else the host's
    MemAvailable (page cache that can be dropped included, as the kernel counts it)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class StepMemory:
    fixed: int  # bytes independent of the batch: weights, grads, optimizer moments, EMA
    per_sample: int  # activation bytes per image of a micro-batch

    def total(self, micro_batch: int) -> int:
        return self.fixed + self.per_sample * micro_batch


def estimate(model, *, ema: bool, amp: bool, grad_checkpointing: bool) -> StepMemory:
    """The memory of one training step of ``model`` (a vitkit ViT) at its configured input size."""
    c = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # weights (all) + grads and AdamW's exp_avg / exp_avg_sq (trainable) + the EMA's copy, fp32
    fixed = 4 * (total + 3 * trainable + (total if ema else 0))
    N, D = c.num_tokens, c.dim
    M = c.hidden_dim
    per_block = N * (10 * D + 2 * M)
    H, W = c.image_hw
    stem = c.in_channels * H * W + N * D  # the input and the patch embedding's output
    if grad_checkpointing:  # only each block's input is kept; one block's activations live at a time
        values = stem + c.depth * N * D + per_block
    else:
        values = stem + c.depth * per_block
    return StepMemory(fixed=fixed, per_sample=values * (2 if amp else 4))


def fit_batch(model, batch: int, *, accum_steps: int = 1, world_size: int = 1, ema: bool, amp: bool,
              grad_checkpointing: bool, device: torch.device, log: Callable[[str], None], lower: bool = True,
              available: Callable[[torch.device], int] | None = None) -> int:
    """The global batch to train with: ``batch`` when its step fits the memory ``available(device)``
    reports (default :func:`available_memory`, looked up per call: tests fake it; times :data:`HEADROOM`), else the largest that fits, said through ``log`` (``lower=False``,
    a resumed run whose batch is part of its state: a ConfigError instead); a ConfigError when one
    image does not fit. Each of ``world_size`` processes steps on micro-batches of
    ceil(batch / world_size / accum_steps) images; on a CPU they share the host's memory."""
    need = estimate(model, ema=ema, amp=amp, grad_checkpointing=grad_checkpointing)
    have = (available or available_memory)(device)
    sharing = world_size if device.type == "cpu" else 1
    budget = int(have * HEADROOM) // sharing
    c = model.config
    H, W = c.image_hw
    what = (f"{need.per_sample / MiB:.0f} MiB of activations per image at {H}x{W} ({c.num_tokens} tokens, {c.depth} "
            f"blocks of width {c.dim}) + {need.fixed / MiB:.0f} MiB of weights, gradients and optimizer state"
            + (f", per process of {sharing}" if sharing > 1 else ""))
    per_step = world_size * accum_steps  # images of the global batch per micro-batch of one process
    micro = math.ceil(batch / per_step)
    if need.total(micro) <= budget:
        return batch
    fits = (budget - need.fixed) // need.per_sample if budget > need.fixed else 0
    where = f"free on {device}" if device.type == "cuda" else "available"
    said = f"{have / GiB:.1f} GiB is {where} (vitkit plans on {HEADROOM:.0%} of it)"
    if fits < 1:
        raise ConfigError(
            f"a training step needs ~{need.total(1) / GiB:.1f} GiB even at batch 1 ({what}); {said}. Use a smaller "
            "--image-size (activations grow with the token count), --grad-checkpointing (keeps one block's "
            "activations) or --amp bf16")
    accum = math.ceil(micro / fits) * accum_steps  # the same batch in micro-batches that fit
    if not lower:
        raise ConfigError(
            f"batch {batch} needs ~{need.total(micro) / GiB:.1f} GiB per step ({what}); {said}. The run's batch is "
            f"part of its saved state: resume with --accum-steps {accum} (the same batch in smaller micro-batches) "
            "or --grad-checkpointing")
    new = min(batch, int(fits) * per_step)
    if new >= 8:
        new -= new % 8  # a round batch: the same fit, steadier kernels
    log(f"memory: batch {batch} needs ~{need.total(micro) / GiB:.1f} GiB per step ({what}); {said}: batch lowered "
        f"to {new} (~{need.total(math.ceil(new / per_step)) / GiB:.1f} GiB). --batch-size to choose; --accum-steps "
        f"{accum} keeps batch {batch} in micro-batches that fit")
    return new

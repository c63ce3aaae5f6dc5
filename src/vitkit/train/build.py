"""Building a run: :func:`build_run` turns a TrainConfig into a :class:`Run` (what the loop reads,
built once, frozen) and the :class:`RunState` it starts from (what the loop changes and saves).

    build_run       seed; pretrained source (read once, checked against the options); data; model
                    (from scratch, a preset or the pretrained weights, with its labels and
                    preprocessing); threads; train loader; DDP / FSDP wrapper; optimizer and schedule;
                    EMA; AMP and grad scaler; loss, MixUp / CutMix, validation loader

Each piece is a small function of the TrainConfig; :func:`vitkit.train.loop.train` only calls
:func:`setup_process` and :func:`build_run`, then runs what they built.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DataSpec, DataSplits, build_data, default_workers, make_loader
from ..data.augment import AugmentChoice, mix_transform
from ..data.file_datasets import add_unlabeled
from ..distributed import DistInfo, init_distributed, wrap_model
from ..errors import ConfigError
from ..eval.evaluate import eval_loader
from . import adapt, finetune
from .amp import choose_amp
from .arch import build_model, check_tokens, read_pretrained_checked
from .config import TrainConfig
from .distill import TOKEN_MODES, add_dist_token, build_distiller, read_teacher, student_config
from .memory import fit_batch
from .state import RunState


@dataclass(frozen=True)
class Run:
    """What a run is built from, set once by :func:`build_run`; not saved (rebuilt from config.yaml
    on resume). What changes as it trains is the :class:`RunState`."""

    cfg: TrainConfig  # with the architecture actually built filled in: what config.yaml records
    data: DataSplits
    device: torch.device
    dist: DistInfo
    wrapped: torch.nn.Module  # what the step calls: the model, or its DDP / FSDP / compiled wrapper
    amp: torch.dtype | None  # the step's autocast dtype (None: fp32), --amp auto resolved (vitkit.train.amp)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixer: Any  # MixUp / CutMix on the device, or None
    # the batch affine's (degrees, translate, scale, shear) in the step, or None: then the loader normalises
    affine: tuple[float, float, float, float] | None
    hflip: bool  # the batch affine draws horizontal flips
    global_batch: int
    total_steps: int
    warmup_steps: int
    val_loader: Any  # None without a validation split
    eval_kw: dict[str, Any]  # vitkit.eval.evaluate's arguments for this run's data and device
    log: Callable[[str], None]  # rank 0's log; the other ranks' is silent
    distill: Any = None  # vitkit.train.distill.Distiller with --teacher, else None
    lora: Any = None  # --lora: the peft model around the model (vitkit.train.adapt), which saves the adapter


def setup_process(cfg: TrainConfig) -> tuple[torch.device, DistInfo]:
    """This process's device and its place among torchrun's processes, with the backends' switches."""
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    setup_backends(cfg, device)
    return device, dist


def pretrained_input_size(pretrained) -> tuple[tuple[int, int], str]:
    """The input size a pretrained source trains at by default, and why: its preprocessing's size when
    the model takes any size (DINOv2 from Hugging Face: table for 518, processor 224), else its table's."""
    c = pretrained.config
    pre = pretrained.preprocess
    size = (pre.get("input_size") if isinstance(pre, dict) else getattr(pre, "input_size", None)) if pre else None
    if c.dynamic_img_size and size and len(size) == 3:
        h, w = int(size[1]), int(size[2])
        return (h, w), f"{h}x{w}, the pretrained model's preprocessing (it takes any size; --image-size to change)"
    h, w = c.image_hw
    return (h, w), f"{h}x{w}, the pretrained model's (--image-size to change)"


def build_run(cfg: TrainConfig, device: torch.device, dist: DistInfo, log, resumed: bool = False
              ) -> tuple[Run, RunState]:
    """Everything checked and built before the first step (module docstring); a fresh RunState.
    ``resumed``: ``cfg`` is a saved run's (its batch is kept, its recorded size said as such)."""
    torch.manual_seed(cfg.seed)
    adapt.check_options(cfg)
    # read before the data (an unreadable source fails first); the input size is chosen with the data's
    pretrained = read_pretrained_checked(cfg) if cfg.pretrained else None
    teacher = read_teacher(cfg) if cfg.teacher else None  # before the data too: an unreadable teacher fails first
    cfg = student_config(cfg, pretrained.config if pretrained is not None else None)
    data = build_data(DataSpec.from_config(cfg))
    if cfg.unlabeled:  # images the teacher labels (--teacher is checked by the config)
        data.notes.append(add_unlabeled(data, cfg.unlabeled))
    size_note = [f"input size: {data.size_note}"] if data.size_note else []
    if resumed and cfg.image_size:  # the size the run recorded, not a flag of this invocation
        size_note = [f"input size: {cfg.image_size}x{cfg.image_size}, the run's own (its config.yaml)"]
    tuned: list[str] = []
    if pretrained is not None:  # the size from the data and the model, the model's preprocessing (vitkit.train.finetune)
        chosen, tuned = finetune.prepare_data(cfg, pretrained, data, max(pretrained_input_size(pretrained)[0]))
        size_note = [chosen] if chosen else size_note
    for note in data.notes + size_note + tuned:
        log(note)
    model, cfg = build_model(cfg, data, pretrained)
    if cfg.teacher and cfg.distill in TOKEN_MODES:
        model = add_dist_token(model)
    check_tokens(model, log, fixed_patch=bool(cfg.pretrained))
    set_threads(cfg, device, model=model, data=data, log=log)
    lora = adapt.adapt_model(cfg, model)  # --lora / --train-only: peft's LoRA layers injected, the rest frozen
    probe = adapt.parse_train_only(cfg.train_only)[0] == "probe"
    model.to(device)
    aug = AugmentChoice.from_config(cfg, in_memory=bool(getattr(data.train, "in_memory", False)),
                                    hflip_ok=data.hflip_ok, classes=data.classes)
    if aug.note and not probe:
        log(aug.note)
    batch = min(cfg.batch_size, len(data.train))  # the last partial batch is dropped: equal batches keep DDP exact
    if not probe:  # a step that would not fit is lowered (a resume keeps its batch: refused instead)
        fitted = fit_batch(model, batch, accum_steps=cfg.accum_steps, world_size=dist.world_size, ema=cfg.ema,
                           amp=cfg.amp in ("bf16", "fp16"), grad_checkpointing=cfg.grad_checkpointing, device=device, log=log,
                           lower=not resumed)
        if fitted < batch:
            batch, cfg = fitted, cfg.replace(batch_size=fitted)
    # --amp auto: measured on this model and CPU (vitkit.train.amp); a resume brings the run's saved choice
    amp_choice = choose_amp(cfg.amp, model, device, max(1, batch // dist.world_size // cfg.accum_steps), dist,
                            probe=probe)
    if amp_choice.note:
        log(amp_choice.note)
    amp = amp_dtype(amp_choice.amp, device)
    cfg, lr_note = finetune.resolve_lr(cfg, batch)  # --lr / --layer-decay 0: auto, for this batch
    if lr_note:
        log(lr_note)
    loss_kind = cfg.loss if cfg.loss != "auto" else ("ce" if data.task == "classification" else "mse")
    if data.task == "regression" and loss_kind == "ce":
        raise ConfigError("loss 'ce' needs a classification dataset; use mse or l1 for csv regression")
    loss_fn = make_loss(data.task, loss_kind, cfg.label_smoothing)
    distiller = build_distiller(cfg, teacher, data, model, loss_fn, device=device, batch_size=batch,
                                random_augment=cfg.augment, distributed=dist.enabled, log=log) if cfg.teacher else None
    if probe:  # the backbone's features of every training image, once; then the head trains on them
        log(f"linear probe: computing the frozen backbone's features of {len(data.train)} training images once")
        feats = adapt.probe_features(model, data.train, mean=data.mean, std=data.std, device=device,
                                     workers=cfg.workers, amp=amp)
        loader = make_loader(feats, batch_size=batch, train=True, seed=cfg.seed, workers=0, rank=dist.rank,
                             world_size=dist.world_size, device_type=device.type, normalize=False)
    else:
        loader = train_loader(data, cfg, batch_size=batch, dist=dist, device_type=device.type, augment=aug)
    wrapped = wrap_model(adapt.ProbeHead(model) if probe else model, dist, cfg.strategy, device)  # before the optimizer: FSDP swaps the parameters
    optimizer, total, warmup = build_optimizer_and_schedule(cfg, model, len(loader), log)
    log(adapt.param_summary(model))
    for group in distiller.param_groups(cfg.weight_decay) if distiller is not None else []:
        optimizer.add_param_group(group)  # the feature projection trains (and is saved) with the run
    fsdp = dist.enabled and cfg.strategy == "fsdp"
    ema = build_ema(cfg, model, sharded=fsdp, log=log, total_steps=total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    val = eval_loader(data.val, 256, dist=dist, workers=cfg.workers, device_type=device.type) \
        if data.val is not None else None
    run = Run(cfg=cfg, data=data, device=device, dist=dist, wrapped=wrapped, amp=amp,
              loss_fn=loss_fn,
              mixer=mix_transform(cfg, data.num_outputs) if cfg.augment and not probe and data.task == "classification"
              else None,
              affine=aug.affine if not probe else None, hflip=aug.affine_flips, global_batch=batch, total_steps=total,
              warmup_steps=warmup, val_loader=val,
              eval_kw=dict(task=data.task, num_outputs=data.num_outputs, mean=data.mean, std=data.std, device=device,
                           dist=dist, regression_loss=loss_kind if loss_kind != "ce" else "mse", labels=data.classes,
                           amp_dtype=amp),
              log=log, distill=distiller, lora=lora)
    state = RunState(model=model, optimizer=optimizer, ema=ema, scaler=scaler, loader=loader, device=device,
                  fsdp=fsdp, labels=list(data.classes) if data.classes else None)
    return run, state


def train_loader(data: DataSplits, cfg: TrainConfig, *, batch_size: int, dist: DistInfo, device_type: str,
                 augment: AugmentChoice):
    """``vitkit.data.make_loader`` for training (torchdata's StatefulDataLoader): batches ``(x, y)``
    for *this rank*, ``set_epoch(e)`` (order from (seed, e) only), ``len()``, ``state_dict()`` /
    ``load_state_dict()``; under torchrun rank r gets the contiguous slice r of each *global* batch, so
    N processes see exactly what one process sees. ``x`` is float32 normalised in the workers, or in
    [0, 1] when the step runs ``augment``'s batch affine (its zero padding is black), which then
    normalises; the per-image ``augment.sample`` runs in the workers."""
    return make_loader(data.train, batch_size=batch_size, train=True, seed=cfg.seed, workers=cfg.workers,
                       rank=dist.rank, world_size=dist.world_size, device_type=device_type, augment=augment.sample,
                       mean=data.mean, std=data.std, normalize=augment.affine is None,
                       with_index=cfg.teacher_cache)  # --teacher-cache: rows by index


def make_loss(task: str, kind: str, label_smoothing: float):
    if task == "regression":
        fn = F.mse_loss if kind == "mse" else F.l1_loss
        return lambda out, y: fn(out, y.float().view_as(out))
    # class ids and MixUp / CutMix soft targets alike
    return functools.partial(F.cross_entropy, label_smoothing=label_smoothing)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


# forward + backward GFLOP per image under which a step is "light": decoding and augmenting a photo in
# a loader worker (~5-10 ms of one core) then costs as much as the step's share of that image, and the
# workers compete with the step's threads for the cores
LIGHT_STEP_GFLOP = 1.0


def set_threads(cfg: TrainConfig, device: torch.device, model=None, data=None, log=lambda s: None) -> int:
    """``--threads 0`` = every core, but the cores the loader's workers need when the model's step is
    light (:data:`LIGHT_STEP_GFLOP`): then the step's threads and the workers would take turns on the same
    cores, and torch's threads wait for each other at every op (a dim-32 model from photo JPEGs with 2
    threads and 1 worker on 2 cores ran 0.37x the bare loader, 0.84x with 1 thread: issue 21, BENCHMARKS.md).
    A heavier step leaves the workers mostly idle (they decode ahead) and keeps every core. On an idle
    2-core machine even the 35k-parameter digits model (in memory: no workers) trains faster on 2 threads
    than on 1 (benchmarks/train_digits.md); pass ``--threads 1`` when other jobs share the cores."""
    if device.type != "cpu":
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    n = cfg.threads or cores
    in_memory = data is None or bool(getattr(data.train, "in_memory", False))
    workers = 0 if in_memory else (cfg.workers if cfg.workers is not None else default_workers())
    if not cfg.threads and workers and model is not None and cores > 1:
        from ..bench.flops import train_flops

        per_image = train_flops(model.config) / 1e9
        if per_image < LIGHT_STEP_GFLOP:
            n = max(1, cores - workers)
            log(f"threads: {n} of {cores} cores (a step of this model is light, {per_image:.2g} GFLOP an image: "
                f"the loader's {workers} worker(s) keep the rest for decoding; --threads {cores} for every core)")
    torch.set_num_threads(n)
    return n


def setup_backends(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":  # TF32 tensor cores for fp32 matmuls / convs (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a resolved ``--amp`` (off | bf16 | fp16; auto: :func:`vitkit.train.amp.choose_amp`)."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (it relies on a grad scaler); on the CPU use --amp bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def build_optimizer_and_schedule(cfg: TrainConfig, model, steps_per_epoch: int, log):
    """AdamW + (total_steps, warmup_steps) of the warmup-cosine schedule (lr_at is a pure function)."""
    from .optim import build_optimizer

    total = steps_per_epoch * cfg.epochs  # --max-steps stops a run early; it does not rescale the schedule
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup >= total and cfg.warmup_epochs > 0:
        log(f"warning: warm-up ({cfg.warmup_epochs:g} epochs = {warmup} steps) is as long as the whole run "
            f"({total} steps): the learning rate never reaches its peak and never decays. Use fewer "
            f"--warmup-epochs (or more --epochs).")
    return build_optimizer(model, cfg), total, warmup


def build_ema(cfg: TrainConfig, model, sharded: bool = False, log=print, total_steps: int = 0):
    """The EMA of the weights (None when --no-ema), its decay capped for a run of ``total_steps``
    (:func:`vitkit.train.ema.run_decay`). ``sharded``: FSDP shards the parameters across the
    processes; an EMA of them is not supported yet, which the run says instead of dropping it silently."""
    if not cfg.ema:
        return None
    if sharded:
        log("note: no EMA under --strategy fsdp (the EMA of sharded weights is not supported yet): best/ "
            "and the test use the model's own weights; use --strategy ddp to keep an EMA")
        return None
    from .ema import EMA, RUN_FRACTION, run_decay

    decay = run_decay(cfg.ema_decay, total_steps)
    if decay != cfg.ema_decay:
        why = (f"--ema-decay {cfg.ema_decay:g} would average over ~{1 / (1 - cfg.ema_decay):.0f} steps, more than "
               "a tenth of this run")
        log(f"ema: decay {decay:.4g} = 1 - {RUN_FRACTION}/{total_steps} steps ({why})" if decay > 0 else
            f"ema: decay 0, the EMA follows the model: a run of {total_steps} steps is too short to average "
            f"({why})")
    return EMA(model, decay)

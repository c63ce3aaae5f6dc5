"""Building a run: device, data, model (from scratch, a preset or pretrained weights), optimizer,
schedule. Each a small function of the TrainConfig; :func:`vitkit.train.loop.train` calls them in order.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import DataSplits
from ..errors import ConfigError
from .config import ARCH_DEFAULTS, ARCH_FIELDS, TrainConfig

log = logging.getLogger("vitkit.train")

# Tokens per image above which a configuration warns: attention cost grows with N^2, and the
# issue-11 trap (32x32 images trained at 224 with patch 2 = 12,544 tokens: ~10 min per step on a CPU).
TOKEN_BUDGET = 1024
AUTO_PATCH_TOKENS = 256  # the default patch keeps at most this many tokens (ViT-B/16 at 224: 196)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def set_threads(cfg: TrainConfig, device: torch.device) -> int:
    """``--threads 0`` = every core. On an idle 2-core machine even the 35k-parameter digits model
    trains faster on 2 threads than on 1 (benchmarks/train_digits.md); pass ``--threads 1`` when
    other jobs share the cores."""
    if device.type != "cpu":
        return torch.get_num_threads()
    n = cfg.threads or (os.cpu_count() or 1)
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


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (it relies on a grad scaler); on the CPU use --amp bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)


def cpu_linear_kernels(cfg: TrainConfig, model, device: torch.device, say) -> bool:
    """Whether the training step runs fp32 Linear layers on oneDNN (``vitkit.train.kernels``):
    ``--cpu-linear auto`` where it applies, ``onednn`` the same or a ConfigError naming why not."""
    from . import kernels

    if cfg.cpu_linear == "torch" or (cfg.cpu_linear == "auto" and device.type != "cpu"):
        return False
    wide = any(isinstance(m, torch.nn.Linear) and min(m.weight.shape) >= kernels.MIN_FEATURES
               for m in model.modules())
    why = ("the device is " + str(device) if device.type != "cpu" else
           f"--amp {cfg.amp} (autocast picks the kernels)" if cfg.amp != "off" else
           "--compile (inductor picks the kernels)" if cfg.compile else
           "--grad-checkpointing (its recomputation would run the other kernel)" if cfg.grad_checkpointing else
           "this torch has no oneDNN matmul on this CPU (x86-64 builds with oneDNN have it)"
           if not kernels.available() else
           f"no Linear layer of this model is {kernels.MIN_FEATURES}+ features wide both ways (F.linear is as "
           "fast below that, measured)" if not wide else None)
    if why is None:
        say("cpu linear: oneDNN matmuls for the fp32 Linear layers (--cpu-linear torch for F.linear's)")
        return True
    if cfg.cpu_linear == "onednn":
        raise ConfigError(f"--cpu-linear onednn cannot apply: {why}; use --cpu-linear auto or torch")
    return False


# --------------------------------------------------------------------------- architecture
def auto_patch_size(hw: tuple[int, int]) -> int:
    """Smallest patch side >= 2 dividing both sides with at most AUTO_PATCH_TOKENS tokens
    (8x8 -> 2, 28 -> 2, 32 -> 2, 224 -> 14... but 16 is preferred where it fits the budget)."""
    H, W = hw
    g = math.gcd(H, W)
    divisors = [p for p in range(2, g + 1) if g % p == 0] or [1]
    fits = [p for p in divisors if (H // p) * (W // p) <= AUTO_PATCH_TOKENS]
    if not fits:
        return divisors[-1]
    standard = [p for p in (2, 4, 8, 16, 32) if p in fits]  # prefer the usual powers of two
    return standard[0] if standard else fits[0]


def _explicit_arch(cfg: TrainConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ARCH_FIELDS if getattr(cfg, k) is not None}


def model_arch(vc) -> dict[str, Any]:
    """The TrainConfig architecture fields a ViTConfig corresponds to."""
    ph = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
    arch = {"patch_size": ph, "dim": vc.dim, "depth": vc.depth, "num_heads": vc.num_heads,
            "mlp_ratio": round(vc.mlp_dim / vc.dim, 6) if getattr(vc, "mlp_dim", None) else None,
            "pos_embed": vc.pos_embed, "pooling": vc.pooling,
            "fc_norm": bool(vc.fc_norm) if vc.pooling == "mean" else None}
    return arch


def check_fixed_arch(cfg: TrainConfig, vc, what: str) -> None:
    """Architecture values given with ``--pretrained`` must be the model's own."""
    arch = model_arch(vc)
    clash = []
    for k, v in _explicit_arch(cfg).items():
        have = arch.get(k)
        same = have == v or (isinstance(v, float) and have is not None and math.isclose(v, have, rel_tol=1e-6))
        if not same:
            clash.append(f"--{k.replace('_', '-')} {v} (the model has {have})")
    if clash:
        raise ConfigError(f"{what} fixes the architecture; these options cannot apply: {', '.join(clash)}. "
                          "Leave them out (the model's own values are used and recorded in config.yaml)")


def probe_pretrained(cfg: TrainConfig):
    """The pretrained source read once, before the data (its config's input size is the default):
    a :class:`~vitkit.interop.common.Converted` bundle that :func:`build_model` then loads from,
    so the weights are read (or downloaded) once."""
    from ..interop import read_pretrained

    return read_pretrained(cfg.pretrained)


def build_model(cfg: TrainConfig, data: DataSplits, pretrained=None):
    """(model, cfg with the architecture actually built filled in: what config.yaml records).
    ``pretrained``: the bundle :func:`probe_pretrained` read (else ``cfg.pretrained`` is read here)."""
    from .. import ViT, ViTConfig
    from ..config import get_config

    common = dict(image_size=data.image_hw, in_channels=data.in_channels, num_classes=data.num_outputs,
                  task=data.task, drop_path=cfg.drop_path, dropout=cfg.dropout)
    if cfg.pretrained:
        model = load_pretrained(pretrained if pretrained is not None else cfg.pretrained, data,
                                drop_path=cfg.drop_path, dropout=cfg.dropout)
        check_fixed_arch(cfg, model.config, f"--pretrained {cfg.pretrained}")
        if cfg.zeroshot_head:  # the classifier starts as the zero-shot head of the class names
            from ..features.zeroshot import init_training_head

            init_training_head(model, cfg.pretrained, data, cfg.zeroshot_templates, say=log.info)
    elif cfg.model:  # a preset's architecture, with the options given explicitly overriding it
        arch = _explicit_arch(cfg)
        if "pooling" in arch:
            arch["class_token"] = arch["pooling"] == "cls"
        model = ViT(get_config(cfg.model, **common, **arch))
    else:
        a = {**ARCH_DEFAULTS, **_explicit_arch(cfg)}
        a["patch_size"] = a.get("patch_size") or data.patch_size or auto_patch_size(data.image_hw)
        vc = ViTConfig(patch_size=a["patch_size"], dim=a["dim"], depth=a["depth"], num_heads=a["num_heads"],
                       mlp_ratio=a["mlp_ratio"], pos_embed=a["pos_embed"], pooling=a["pooling"],
                       class_token=a["pooling"] == "cls", fc_norm=a["fc_norm"] and a["pooling"] == "mean",
                       name="vitkit_train", **common)
        model = ViT(vc)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError("--grad-checkpointing: this vitkit's ViT has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    recorded = {k: v for k, v in model_arch(model.config).items() if k in ARCH_FIELDS}
    recorded = {k: v for k, v in recorded.items() if _representable(k, v)}
    return model, cfg.replace(**recorded, image_size=data.image_hw[0] if data.image_hw[0] == data.image_hw[1]
                              else cfg.image_size)


def _representable(name: str, value) -> bool:
    """Whether ``value`` is a valid TrainConfig value (e.g. a pretrained 'map' pooling is not)."""
    try:
        TrainConfig(**{name: value})
    except ConfigError:
        return False
    return value is not None


def load_pretrained(source, data: DataSplits, **overrides):
    """Weights from ``source`` (any format ``vitkit.from_pretrained`` reads, or the bundle
    ``read_pretrained`` made of one), resampled to this dataset's input size and channels, with a
    fresh head for its classes / targets."""
    from vitkit.interop import model_from_converted, read_pretrained
    from vitkit.model.vit import ViT

    conv = read_pretrained(source) if isinstance(source, (str, Path)) else source
    adapt = dict(num_classes=data.num_outputs, image_size=data.image_hw, in_channels=data.in_channels)
    with warnings.catch_warnings():
        # The loader's "classifier head is re-initialised (train or fine-tune it before use)" is for users of
        # from_pretrained; here it is the plan, and the warning would point into this file. Logged instead.
        warnings.filterwarnings("ignore", message=r"num_classes \d+ -> \d+: the classifier head is re-initialised")
        model = model_from_converted(conv, adapt=adapt, **overrides)
    log.info("%s: fine-tuning starts from a fresh %d-output head", getattr(conv, "source", source), data.num_outputs)
    # Fine-tuning always starts from a fresh head, even when the class count happens to match, with
    # the model's own init (ViT.init_weights: truncated normal at +-2 std; nn.init.trunc_normal_'s
    # bounds are absolute and would truncate nothing).
    c = model.config
    head_in = model.head.in_features if isinstance(model.head, torch.nn.Linear) else c.dim
    holder = _InitHolder()
    holder.head = torch.nn.Linear(head_in, data.num_outputs)
    ViT.init_weights(holder)
    model.head = holder.head
    # the fresh head has a bias even where the source's had none (CLIP's projection): the config says so,
    # or the run's own checkpoint would not load back
    model.config = c.replace(num_classes=data.num_outputs, task=data.task, head_bias=True)
    return model.train()


class _InitHolder(torch.nn.Module):
    """Gives ViT.init_weights a module tree holding only the new head: every optional part it looks
    for (tokens, position table, attention pooling...) is absent (None)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return None


def check_tokens(model, say) -> None:
    c = model.config
    n = c.num_tokens
    if n > TOKEN_BUDGET:
        H, W = c.image_hw
        p = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        better = auto_patch_size((H, W))
        say(f"warning: {n} tokens per image ({H}x{W} input, patch {p}) is over the budget of {TOKEN_BUDGET}: "
            f"attention cost grows with the square of the token count, so each step is slow. Use a larger "
            f"--patch-size (e.g. {better}: {(H // better) * (W // better)} tokens) or a smaller --image-size.")


def preprocess_cfg(data: DataSplits) -> dict[str, Any]:
    return {"input_size": [data.in_channels, *data.image_hw], "mean": list(data.mean), "std": list(data.std),
            "interpolation": "bilinear", "crop_pct": 1.0}


def build_optimizer_and_schedule(cfg: TrainConfig, model, steps_per_epoch: int, say):
    """AdamW + (total_steps, warmup_steps) of the warmup-cosine schedule (lr_at is a pure function)."""
    from .optim import build_optimizer

    total = steps_per_epoch * cfg.epochs  # --max-steps stops a run early; it does not rescale the schedule
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup >= total and cfg.warmup_epochs > 0:
        say(f"warning: warm-up ({cfg.warmup_epochs:g} epochs = {warmup} steps) is as long as the whole run "
            f"({total} steps): the learning rate never reaches its peak and never decays. Use fewer "
            f"--warmup-epochs (or more --epochs).")
    return build_optimizer(model, cfg), total, warmup


def build_ema(cfg: TrainConfig, model, sharded: bool = False, say=print, total_steps: int = 0):
    """The EMA of the weights (None when --no-ema), its decay capped for a run of ``total_steps``
    (:func:`vitkit.train.ema.run_decay`). ``sharded``: FSDP shards the parameters across the
    processes; an EMA of them is not supported yet, which the run says instead of dropping it silently."""
    if not cfg.ema:
        return None
    if sharded:
        say("note: no EMA under --strategy fsdp (the EMA of sharded weights is not supported yet): best/ "
            "and the test use the model's own weights; use --strategy ddp to keep an EMA")
        return None
    from .ema import EMA, RUN_FRACTION, run_decay

    decay = run_decay(cfg.ema_decay, total_steps)
    if decay != cfg.ema_decay:
        say(f"ema: decay {decay:.4g} = 1 - {RUN_FRACTION}/{total_steps} steps (--ema-decay {cfg.ema_decay:g} would "
            f"average over ~{1 / (1 - cfg.ema_decay):.0f} steps, more than a tenth of this run)")
    return EMA(model, decay)

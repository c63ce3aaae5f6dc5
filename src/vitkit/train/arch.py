"""The model a run trains: from scratch (the digits recipe's defaults, a patch size chosen from the
input size), a preset's architecture with the options given, or pretrained weights with a fresh head;
the architecture options ``--pretrained`` fixes; the token budget's warning. The model carries the
data's labels and preprocessing from the start (they are saved with every checkpoint of it).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..data import DataSplits
from ..errors import ConfigError
from .config import ARCH_DEFAULTS, ARCH_FIELDS, TrainConfig

logger = logging.getLogger("vitkit.train")

# Tokens per image above which a configuration warns: attention cost grows with N^2, and the
# issue-11 trap (32x32 images trained at 224 with patch 2 = 12,544 tokens: ~10 min per step on a CPU).
TOKEN_BUDGET = 1024
AUTO_PATCH_TOKENS = 256  # the default patch keeps at most this many tokens (ViT-B/16 at 224: 196)


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


def read_pretrained_checked(cfg: TrainConfig):
    """``--pretrained``'s source read once, before the data (its config's input size is the default),
    and its architecture checked against the options given: a :class:`~vitkit.interop.common.Converted`
    bundle that :func:`build_model` then loads from, so the weights are read (or downloaded) once."""
    from ..interop import read_pretrained

    pretrained = read_pretrained(cfg.pretrained)
    check_fixed_arch(cfg, pretrained.config, f"--pretrained {cfg.pretrained}")
    return pretrained


def build_model(cfg: TrainConfig, data: DataSplits, pretrained=None):
    """(model, cfg with the architecture actually built filled in: what config.yaml records). The
    model carries the data's labels and preprocessing (saved with its weights). ``pretrained``: the
    bundle :func:`read_pretrained_checked` read (else ``cfg.pretrained`` is read here)."""
    from .. import ViT, ViTConfig
    from ..config import get_config

    common = dict(image_size=data.image_hw, in_channels=data.in_channels, num_classes=data.num_outputs,
                  task=data.task, drop_path=cfg.drop_path, dropout=cfg.dropout)
    if cfg.pretrained:
        model = load_pretrained(pretrained if pretrained is not None else read_pretrained_checked(cfg), data,
                                drop_path=cfg.drop_path, dropout=cfg.dropout)
        if cfg.zeroshot_head:  # the classifier starts as the zero-shot head of the class names
            from ..features.zeroshot import init_training_head

            init_training_head(model, cfg.pretrained, data, cfg.zeroshot_templates, say=logger.info)
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
        model.set_grad_checkpointing(True)
    model.labels = list(data.classes) if data.classes else None
    model.preprocess_cfg = preprocess_cfg(data)
    if data.task == "regression":
        model.pretrained_info = {"task": "regression", "targets": data.classes}
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
    logger.info("%s: fine-tuning starts from a fresh %d-output head", getattr(conv, "source", source), data.num_outputs)
    # Fine-tuning always starts from a fresh head, even when the class count happens to match, with
    # the model's own init (ViT.init_weights: truncated normal at +-2 std; nn.init.trunc_normal_'s
    # bounds are absolute and would truncate nothing).
    c = model.config
    head_in = model.head.in_features if isinstance(model.head, torch.nn.Linear) else c.dim
    head_only = _HeadOnly()
    head_only.head = torch.nn.Linear(head_in, data.num_outputs)
    ViT.init_weights(head_only)
    model.head = head_only.head
    # the fresh head has a bias even where the source's had none (CLIP's projection): the config says so,
    # or the run's own checkpoint would not load back
    model.config = c.replace(num_classes=data.num_outputs, task=data.task, head_bias=True)
    return model.train()


class _HeadOnly(torch.nn.Module):
    """Gives ViT.init_weights a module tree holding only the new head: every optional part it looks
    for (tokens, position table, attention pooling...) is absent (None)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return None


def check_tokens(model, log, fixed_patch: bool = False) -> None:
    """Warn above TOKEN_BUDGET tokens, advising what can change: ``fixed_patch`` (--pretrained fixes the
    patch, and refuses --patch-size) advises only a smaller --image-size."""
    c = model.config
    n = c.num_tokens
    if n > TOKEN_BUDGET:
        H, W = c.image_hw
        p = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        if fixed_patch:
            k = math.isqrt(TOKEN_BUDGET - c.num_prefix_tokens)  # patches per side within the budget
            advice = (f"Use a smaller --image-size (a multiple of the patch {p}, e.g. {k * p}: {k * k} patches; the "
                      f"pretrained model fixes the patch)")
        else:
            better = auto_patch_size((H, W))
            advice = (f"Use a larger --patch-size (e.g. {better}: {(H // better) * (W // better)} tokens) or a smaller "
                      "--image-size")
        log(f"warning: {n} tokens per image ({H}x{W} input, patch {p}) is over the budget of {TOKEN_BUDGET}: "
            f"attention cost grows with the square of the token count, so each step is slow. {advice}.")


def preprocess_cfg(data: DataSplits) -> dict[str, Any]:
    """What the run's data is read with: a fine-tune's adopted model preprocessing, else the data's own."""
    if data.preprocess is not None:
        return data.preprocess.to_dict()
    return {"input_size": [data.in_channels, *data.image_hw], "mean": list(data.mean), "std": list(data.std),
            "interpolation": "bilinear", "crop_pct": 1.0}

"""What ``vitkit train --pretrained SRC`` does when the user says nothing else (issue 25, section 4):

    prepare_data      both below, where the data is built, with the lines that say what was chosen
    input_size        the input side, from the data's size and the model: a pretrained ViT takes any
                      multiple of its patch (the position table is resampled), so tiny images are not
                      blown up to the model's 224 / 518 px (25x25 faces at 518: 1,370 tokens, OOM)
    adopt_preprocess  the model's own preprocessing (mean / std, interpolation, crop) for every split,
                      saved as the run's: DINOv2 features of photos normalised with 0.5 instead of
                      ImageNet's mean / std drift (cosine 0.968-0.988)
    resolve_lr        a fine-tuning learning rate where --lr is not given (the from-scratch 3e-3 keeps a
                      real DINOv2 at chance on faces; 1e-4 reaches 1.00)

Each choice is logged with its reason, and never as a flag the user did not pass.
"""

from __future__ import annotations

import math

from ..data import DataSplits
from ..preprocess import Preprocess

# Tiny images are upscaled at most this much (to the next multiple of the patch): 25x25 faces -> 112 px
# for DINOv2's patch 14, 3.5 face pixels per patch. Beyond it the upscaled pixels carry nothing new
# while the cost grows with the token count squared; measured on the faces set (docs/training.md).
MAX_UPSCALE = 4
SCRATCH_LR = 3e-3  # the digits recipe (benchmarks/train_digits.md)
FINETUNE_LR = 1e-4  # every pretrained weight trains: DINOv2-S/14 on lfw faces, 3 epochs -> 1.00 (issue 25)
FINETUNE_LAYER_DECAY = 0.75  # BEiT / MAE's fine-tuning range is 0.65-0.75; the lower blocks move least
# only the last N blocks train (--train-only last:N): between the two, no layer-wise decay (the blocks that
# train are the top ones; decay would starve them). DINOv2-S/14 on upsampled digits, benchmarks/adapt.py
PARTIAL_LR = 3e-4
ADAPTER_LR = 1e-3  # only LoRA adapters / norms / the head train: the usual LoRA and linear-probe range
LR_BATCH = 64  # the batch the fine-tuning rates are for; others scale by sqrt (Adam's rule, Malladi et al. 2022)


def prepare_data(cfg, pretrained, data: DataSplits, preprocess_side: int) -> tuple[str | None, list[str]]:
    """The data of a fine-tune from ``pretrained`` (read_pretrained's bundle) made ready: its input size
    (:func:`input_size`, where --image-size is not given) and, with --preprocess auto, the model's own
    preprocessing adopted (:func:`adopt_preprocess`). Returns (the input-size line, None where the size
    was given; the other lines to log)."""
    chosen, notes = None, []
    if not cfg.image_size:
        side, why = input_size(pretrained, data, preprocess_side)
        resize_data(data, side, why)
        chosen = f"input size: {side}x{side}: {why}"
    pre = source_preprocess(pretrained, data.in_channels, data.image_hw[0]) if cfg.preprocess == "auto" else None
    if pre is not None:
        adopt_preprocess(data, pre)
        crop = (f"center crop {pre.crop_pct:.1%}" if pre.crop_mode == "center" else
                "squashed" + (f", center crop {pre.crop_pct:.1%}" if pre.crop_pct < 1 else ""))
        notes.append(f"preprocessing: the pretrained model's own (mean {_nums(pre.mean)}, std {_nums(pre.std)}, "
                     f"{pre.interpolation}, {crop}) for training, validation and the saved run; --preprocess data "
                     "for the data's")
    return chosen, notes


def _nums(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def input_size(pretrained, data: DataSplits, preprocess_side: int) -> tuple[int, str]:
    """(side, why) for a fine-tune whose --image-size is not given: the smallest multiple of the patch
    at or above MAX_UPSCALE x the data's side, and never above ``preprocess_side`` (the side the
    pretrained model is fed at: its preprocessing's, else its table's)."""
    c = pretrained.config
    p = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    H, W = data.image_hw
    side = max(p, min(preprocess_side, p * math.ceil(MAX_UPSCALE * max(H, W) / p)))
    family = (pretrained.info or {}).get("family") or "the pretrained model"
    takes = (f"{family} takes any multiple of {p}" if c.dynamic_img_size else
             f"{family}'s position table is resampled to any multiple of {p}")
    if side == preprocess_side:
        why = f"the pretrained model's preprocessing size ({takes})"
    else:
        why = (f"data is {W}x{H} and {takes}: the first multiple at or above {MAX_UPSCALE}x the data's side, not the "
               f"model's preprocessing size {preprocess_side} ({(preprocess_side // p) ** 2} patches)")
    return side, f"{why}; --image-size to change"


def source_preprocess(pretrained, in_channels: int, side: int) -> Preprocess | None:
    """The pretrained source's own preprocessing at the run's input size and channel count, or None
    where the source records none (the data's normalisation is kept then)."""
    pre = Preprocess.coerce(pretrained.preprocess)
    return pre.for_input(in_channels, (side, side)) if pre is not None else None


def adopt_preprocess(data: DataSplits, pre: Preprocess) -> None:
    """Every split is read with ``pre``: its resize / crop / interpolation (the loaders' ``model_preprocess``),
    its mean / std (the step's normalisation); the model saves the same ``pre``."""
    data.preprocess = pre
    data.mean, data.std = list(pre.mean), list(pre.std)
    data.image_hw = tuple(pre.input_size[1:])
    for _, ds in data.splits():
        ds.mean, ds.std, ds.image_hw = list(pre.mean), list(pre.std), data.image_hw
        ds.model_preprocess = pre


def resize_data(data: DataSplits, side: int, note: str) -> None:
    """The data's input size set to ``side`` (as build_data sets it on every split)."""
    data.image_hw, data.size_note = (side, side), note
    for _, ds in data.splits():
        ds.image_hw = (side, side)


def resolve_lr(cfg, batch: int):
    """(cfg with ``lr`` and ``layer_decay`` set, a line saying why) where either is 0 (auto; the line
    is None when both were given). Fine-tuning rates are for batch LR_BATCH, scaled by sqrt(batch / LR_BATCH)."""
    if cfg.lr and cfg.layer_decay:
        return cfg, None
    scale = math.sqrt(batch / LR_BATCH)
    if not cfg.pretrained:  # the digits recipe's rate at any batch, as before auto existed
        base, decay, what, scale = SCRATCH_LR, 1.0, "the from-scratch default", 1.0
    else:
        from .adapt import parse_train_only

        mode = parse_train_only(cfg.train_only)[0]
        if cfg.lora or mode in ("head", "norms+head", "probe"):
            base, decay, what = ADAPTER_LR, 1.0, "the pretrained weights stay frozen: the adapters' default"
        elif mode == "last":
            base, decay, what = PARTIAL_LR, 1.0, "only the last blocks train: the partial fine-tuning default"
        else:
            base, decay, what = FINETUNE_LR, FINETUNE_LAYER_DECAY, "the fine-tuning default"
    parts = []
    lr, layer_decay = cfg.lr, cfg.layer_decay or decay
    if not cfg.lr:
        lr = base * scale
        how = f"{base:g} x sqrt(batch {batch} / {LR_BATCH})" if scale != 1 else f"at batch {batch}"
        parts.append(f"lr {lr:.3g} ({what} {how})")
    if not cfg.layer_decay and layer_decay < 1:
        parts.append(f"layer-wise decay {layer_decay:g} (each block down from the head learns {layer_decay:g}x as fast)")
    # from scratch the rate is the recipe's as it always was: not worth a line of the digits demo's log
    note = ", ".join(parts) + "; --lr / --layer-decay to change" if parts and cfg.pretrained else None
    return cfg.replace(lr=lr, layer_decay=layer_decay), note

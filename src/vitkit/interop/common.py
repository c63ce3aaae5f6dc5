"""Shared pieces of the weight converters: safe file reading, rename tables, the strict load
report, config inference from tensor shapes, and adapting a state dict to another resolution,
class count or channel count.

Every converter turns its source into ``Converted`` (a vitkit-named state dict + a ViTConfig +
preprocessing + labels); :func:`~vitkit.interop.load.model_from_converted` then builds the model and loads it through
:func:`load_into`, which checks every name and shape and produces a :class:`LoadReport`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError
from ..io import check_extension, load_safetensors

log = logging.getLogger("vitkit.interop")

# Widths of the published variants -> heads (paper Table 1, DeiT). Used when shapes cannot tell.
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DEFAULT_HEAD_DIM = 64


# --------------------------------------------------------------------------- reading files
def _unpickle_refusal(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry with
    ``weights_only=False`` or to allowlist the class (vitkit never runs code from a checkpoint)."""
    text = str(e)
    # torch 2.6+ names the refused object as "GLOBAL module.name" ("Unsupported global: GLOBAL
    # argparse.Namespace was not an allowed global", "unsupported GLOBAL posix.system whose module ...")
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f" (it refers to the Python object {m.group(1)})"
    first = text.splitlines()[0].strip() if text.strip() else ""
    return "" if "weights_only" in text or not first else f" ({type(e).__name__}: {first})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a ``.pth``/``.bin``/``.pt`` pickle read with
    ``torch.load(weights_only=True)`` (never a full unpickle: code in the file cannot run). The
    content decides which reader runs; an extension that says otherwise is an error naming both."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    kind = check_extension(p)
    if kind == "safetensors":
        return load_safetensors(p)
    if kind == "numpy":
        raise CheckpointError(f"{p} is a NumPy archive; load it with format='jax'")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, ...: all mean "not a plain tensor file"
        raise CheckpointError(
            f"refusing to load {p}: it is not a plain tensor checkpoint that torch.load(weights_only=True) "
            f"accepts{_unpickle_refusal(e)}; it may contain arbitrary Python objects or code, which vitkit "
            "never executes. Convert it to safetensors in a trusted environment first") from e
    return unwrap_state_dict(obj, p)


def unwrap_state_dict(obj: Any, source: Any = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual wrappers ({"state_dict": ...}, {"model": ...})."""
    for key in ("state_dict", "model", "model_state", "module", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k[7:] if k.startswith("module.") else k] = v
    if not out:
        raise CheckpointError(f"{source}: the checkpoint holds no tensors")
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def dir_config(path: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a checkpoint directory, or None when there is none readable."""
    cfg = Path(path) / "config.json"
    if not (Path(path).is_dir() and cfg.is_file()):
        return None
    try:
        return read_json(cfg)
    except CheckpointError:
        return None


# --------------------------------------------------------------------------- the report
@dataclass
class LoadReport:
    """What happened to every tensor of one load. ``ok`` when nothing is missing, unexpected or
    mis-shaped; ``notes`` record deliberate changes (re-initialised head, resampled table...)."""

    source: str = ""
    format: str = ""
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"load report for {self.source} (format {self.format}): {self.loaded} tensors loaded"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for name, want, got in self.mismatched:
            lines.append(f"  mis-shaped: {name}: model expects {list(want)}, checkpoint has {list(got)}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": [[n, list(a), list(b)] for n, a, b in self.mismatched], "notes": self.notes}


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], report: LoadReport, strict: bool = True,
              skip_missing: tuple[str, ...] = ()) -> LoadReport:
    """Copy ``state`` into ``model`` after checking every name and shape; fill ``report``.
    With ``strict`` a non-empty report raises CheckpointError listing the problems (nothing is
    copied then). ``skip_missing`` are model names deliberately left at their init (noted)."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if name not in skip_missing:
                report.missing.append(name)
        elif tuple(state[name].shape) != tuple(tensor.shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(state[name].shape)))
    report.unexpected.extend(k for k in state if k not in own)
    if strict and not report.ok:
        raise CheckpointError(
            f"{report}\nthe checkpoint does not match the model built for it; pass strict=False to load what "
            "matches (the rest keeps its random init), or fix the config with arch=/overrides"
        )
    good = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    with torch.no_grad():
        for k, v in good.items():
            own[k].copy_(v.to(own[k].dtype))
    refuse_non_finite(report.source, {k: own[k] for k in good})
    report.loaded = len(good)
    return report


def refuse_non_finite(source: str, tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming the tensors that hold NaN or inf (a model computing with them outputs
    NaN for every image). One sum per tensor: any NaN or inf makes it non-finite (ViT-B's 86M
    weights: ~14 ms, where an elementwise isfinite takes ~0.8 s); only then are the values counted
    (a sum that merely overflows finds none and passes)."""
    bad = []
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v.sum())):
            nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            if nan or inf:
                bad.append(f"{k} ({nan} NaN, {inf} inf of {v.numel()} values)")
    if bad:
        more = f" and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""
        raise CheckpointError(f"{source}: non-finite weights in {', '.join(bad[:3])}{more}; a model cannot compute "
                              "with them (a training run that diverged, or a damaged file): load another checkpoint")


# --------------------------------------------------------------------------- inference from shapes
def is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def guess_heads(dim: int, hint: int | None = None, source: str = "") -> int:
    """Heads are invisible in the weights (the fused qkv matrix looks the same for any split).
    Take ``hint`` (arch / overrides), else the published variant of this width, else dim // 64."""
    if hint:
        return int(hint)
    if dim in HEADS_BY_DIM:
        heads = HEADS_BY_DIM[dim]
        log.info("%s: num_heads=%d taken from the published ViT variant of width %d", source, heads, dim)
        return heads
    heads = max(1, dim // DEFAULT_HEAD_DIM) if dim % DEFAULT_HEAD_DIM == 0 else 1
    warnings.warn(
        f"{source}: the number of attention heads cannot be read from the weights; using num_heads={heads} "
        f"(head_dim {DEFAULT_HEAD_DIM} rule). Pass num_heads=... or arch=... if that is wrong.",
        stacklevel=3,
    )
    return heads


def _fits(hint: Any, n: int, patch: tuple[int, int]) -> tuple[int, int] | None:
    if hint is None:
        return None
    from ..config import to_2tuple

    h, w = to_2tuple(hint, "image_size")
    return (h, w) if (h // patch[0]) * (w // patch[1]) == n and h % patch[0] == 0 and w % patch[1] == 0 else None


def grid_from_rows(n: int, patch: tuple[int, int], *size_hints: Any) -> tuple[int, int]:
    """Image size (H, W) for a table of ``n`` patch rows: the first hint (user's ``image_size``,
    ``arch``'s size, the checkpoint's own config...) whose grid has ``n`` cells, else square.
    Hints that do not fit are skipped: ``image_size`` may also be a target to resample to."""
    for hint in size_hints:
        if (hw := _fits(hint, n, patch)) is not None:
            return hw
    if not is_square(n):
        given = [h for h in size_hints if h is not None]
        # the sizes that do fit, nearest to square first: what to pass instead of a size already given
        fits = sorted(((a * patch[0], n // a * patch[1]) for a in range(1, n + 1) if n % a == 0),
                      key=lambda hw: abs(hw[0] - hw[1]))[:4]
        raise CheckpointError(
            f"the position table has {n} patch rows, not a square grid"
            + (f", and none of the sizes given ({', '.join(map(str, given))}) has {n} patches of {patch}"
               if given else "")
            + f"; pass image_size=(H, W) (or arch=) with (H/ph)*(W/pw) = {n}: one of {', '.join(map(str, fits))}"
        )
    s = math.isqrt(n)
    return s * patch[0], s * patch[1]


def size_hints(hints: dict[str, Any] | None, arch: ViTConfig | None, *more: Any) -> tuple[Any, ...]:
    """Candidate image sizes to read a position table's grid by, in order of trust: the user's
    ``image_size``, then ``arch``'s, then the checkpoint's own (``more``)."""
    return ((hints or {}).get("image_size"), arch.image_size if arch is not None else None, *more)


def layout_from_rows(rows: int, num_prefix: int, patch: tuple[int, int], *size_hints: Any,
                     prefix_rows: bool | None = None, prefer_prefix: bool = True) -> tuple[tuple[int, int], bool]:
    """(image size, whether the table has rows for the ``num_prefix`` prefix tokens) for a learned
    table of ``rows`` rows. ``prefix_rows`` when the source says; else the first size hint that
    fits either reading decides; else the square reading (when both are square: prefix rows if
    ``prefer_prefix``, timm's default, else none, as timm's register models)."""
    if prefix_rows is not None or num_prefix == 0:
        with_prefix = bool(prefix_rows) and num_prefix > 0
        return grid_from_rows(rows - (num_prefix if with_prefix else 0), patch, *size_hints), with_prefix
    for hint in size_hints:
        if (hw := _fits(hint, rows - num_prefix, patch)) is not None:
            return hw, True
        if (hw := _fits(hint, rows, patch)) is not None:
            return hw, False
    if is_square(rows - num_prefix) == is_square(rows):  # both or neither: the source's default (the error
        with_prefix = prefer_prefix                     # then names the sizes that fit that reading)
    else:
        with_prefix = is_square(rows - num_prefix)
    return grid_from_rows(rows - (num_prefix if with_prefix else 0), patch, *size_hints), with_prefix


def family_parts(config: ViTConfig, allowed: tuple[str, ...] = ()) -> list[str]:
    """The config's parts beyond the plain ViT (``norm_pre``, no patch bias, ``pooling='map'``...)
    that are not in ``allowed``: an exporter to a format without them refuses such a model."""
    c = config
    parts = {
        "norm_pre": bool(getattr(c, "norm_pre", False)), "patch_bias": not getattr(c, "patch_bias", True),
        "head_bias": not getattr(c, "head_bias", True), "dist_token": bool(getattr(c, "dist_token", False)),
        "map": c.pooling == "map", "swiglu": getattr(c, "mlp_layer", "mlp") == "swiglu",
        "rmsnorm": getattr(c, "norm_layer", "layernorm") == "rmsnorm",
        "patch_norm": bool(getattr(c, "patch_norm", False)), "proj_bias": not getattr(c, "proj_bias", True),
        "map_head": c.pooling == "map" and getattr(c, "map_head", "latent") != "latent",
        # EVA-02 / Perception Encoder parts and NaFlex input (timm's Eva and NaFlexVit layouts hold them)
        "mlp_norm": bool(getattr(c, "mlp_norm", False)), "attn_norm": bool(getattr(c, "attn_norm", False)),
        "no_final_norm": not getattr(c, "final_norm", True),
        "map_pool_layout": c.pooling == "map" and (getattr(c, "map_num_heads", None) is not None
                                                   or getattr(c, "map_mlp_ratio", None) is not None
                                                   or bool(getattr(c, "map_prefix", False))),
        "naflex": getattr(c, "naflex_max_patches", None) is not None,
    }
    return [k for k, on in parts.items() if on and k not in allowed]


# --------------------------------------------------------------------------- the converted bundle
@dataclass
class Converted:
    """A checkpoint translated into vitkit's names, plus what travels with it."""

    config: ViTConfig
    state: dict[str, torch.Tensor]
    format: str
    source: str
    preprocess: Any = None  # a vitkit.preprocess.Preprocess or its dict form (validated on load)
    labels: list[str] | None = None
    unexpected: list[str] = field(default_factory=list)  # source keys no rule understood
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def adapt_state(state: dict[str, torch.Tensor], old: ViTConfig, new: ViTConfig,
                notes: list[str]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Move a checkpoint's tensors from config ``old`` to ``new``: resample the learned position
    table to a new grid, drop the head when the class count changes (re-initialised), sum the
    patch kernel over RGB for a 1-channel model. Returns the state and the names left at init.
    The table is resampled as the source implementation does it (``old.pos_resample``)."""
    from ..model.pos_embed import get_pos_resampler

    state = dict(state)
    skip: tuple[str, ...] = ()
    if "pos_embed" in state and old.grid_size != new.grid_size:
        pe = state["pos_embed"]
        prefix = pe.shape[1] - old.num_patches
        state["pos_embed"] = get_pos_resampler(old.pos_resample)(pe, new.grid_size, old.grid_size, prefix)
        notes.append(f"position embedding resampled from grid {old.grid_size} to {new.grid_size} "
                     f"(image {old.image_hw} -> {new.image_hw}) as {old.pos_resample} does (vitkit.model.pos_embed)")
    if old.in_channels != new.in_channels and "patch_embed.proj.weight" in state:
        w = state["patch_embed.proj.weight"]
        if new.in_channels == 1:
            state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
            notes.append(f"patch kernels summed over the {old.in_channels} input channels for a 1-channel model "
                         "(a grey image replicated to RGB gives the same tokens)")
        else:
            reps = math.ceil(new.in_channels / old.in_channels)
            w = w.repeat(1, reps, 1, 1)[:, : new.in_channels] * (old.in_channels / new.in_channels)
            state["patch_embed.proj.weight"] = w
            notes.append(f"patch kernels tiled from {old.in_channels} to {new.in_channels} channels and rescaled")
    if old.num_classes != new.num_classes:
        for k in ("head.weight", "head.bias"):
            state.pop(k, None)
        skip = ("head.weight", "head.bias") if new.num_classes > 0 else ()
        msg = (f"num_classes {old.num_classes} -> {new.num_classes}: the classifier head is re-initialised "
               "(train or fine-tune it before use)")
        notes.append(msg)
        warnings.warn(msg, stacklevel=4)
    return state, skip

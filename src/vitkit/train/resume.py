"""Resuming a run: what ``vitkit train --resume RUN --key value`` may change, the run's effective
config (config.yaml + amendments.yaml), and the checks made before anything is written.

    read_resume        the effective config, the requested changes (refused ones are an error), the
                       saved state (None: the run stopped before its first checkpoint), checked
                       against the number of epochs
    check_same_labels  after the data is built: it has the classes the run was trained on
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write_text
from .checkpoint import STATE_NAME, load_state
from .config import ARCH_FIELDS, PER_INVOCATION, TrainConfig, check_keys, drop_removed, read_config_file
from .options import load_yaml, short

AMENDMENTS_FILE = "amendments.yaml"

# What `vitkit train --resume RUN --key value` may change: how long the schedule runs and at what
# learning rate, and how / where the run executes. Each change is appended to RUN/amendments.yaml
# ({time, step, epoch, changes}); config.yaml stays as the run was started, and the run's effective
# config is config.yaml + the amendments in order (read_run_config).
RESUME_CHANGEABLE = ("epochs", "lr", "min_lr", "warmup_epochs", "grad_clip", "ema_decay", "select", "eval_every",
                     "data_dir", "download", "skip_bad_images", "workers", "threads", "device", "amp", "compile",
                     "strategy", "grad_checkpointing", "accum_steps", "deterministic", "progress",
                     "log_every", "tensorboard")
# Everything else is refused on --resume, with the reason: the saved weights, optimizer state or data
# order belong to the value the run started with.
_SHAPES = "it changes the model's shapes: the saved weights would not fit"
_DATA = "it changes which images and labels the run trains and validates on"
_RECIPE = "it changes the training recipe the saved weights are part of"
RESUME_REFUSED: dict[str, str] = {
    **dict.fromkeys(("model", "pretrained", "patch_size", "dim", "depth", "num_heads", "mlp_ratio", "pos_embed",
                     "pooling", "fc_norm", "num_classes", "image_size"), _SHAPES),
    **dict.fromkeys(("dataset", "subset", "val_fraction", "test_fraction", "target_columns", "allow_absolute_paths",
                     "allow_empty_classes", "image_column", "label_column", "unlabeled"), _DATA),
    "seed": "it changes the data order, the augmentation and the validation split of the run",
    "batch_size": "it changes the steps per epoch and the data order, and the saved position in the epoch",
    **dict.fromkeys(("weight_decay", "betas", "layer_decay"),
                    "the saved optimizer state carries the run's own value (torch restores it with the state)"),
    "ema": "the saved state has (or lacks) an EMA of the weights",
    **dict.fromkeys(("lora", "lora_targets"), "it changes the LoRA adapters' shapes: the saved adapters and their "
                                              "optimizer state would not fit"),
    **dict.fromkeys(("lora_alpha", "lora_dropout", "train_only"),
                    "it changes what trains, or how, in the adapted model the saved state belongs to"),
    **dict.fromkeys(("teacher", "teacher_zeroshot", "distill"),
                    "the saved weights were distilled from that teacher, in that mode (token / feature: with their own "
                    "token or projection)"),
}


def _silent(msg: str) -> None:
    pass


def read_run_config(run_dir: str | Path, note=_silent) -> dict[str, Any]:
    """A run's effective options: its ``config.yaml`` (as the run was started) with the changes of
    ``amendments.yaml`` applied in order. Per-invocation options (``max_steps``, which an older vitkit
    saved) are dropped; so are options vitkit no longer has, each named through ``note``."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"--resume {run_dir}: no config.yaml there (not a vitkit training run)")
    # out / overwrite: the run dir is --resume's argument
    data = read_config_file(saved, note=_silent, removed_note=note)
    for a in read_amendments(run_dir, note):
        data.update(a["changes"])
    for k in PER_INVOCATION:
        data.pop(k, None)
    data.setdefault("preprocess", "data")  # a run saved before --preprocess existed trained with the data's
    return data


def read_amendments(run_dir: str | Path, note=_silent) -> list[dict[str, Any]]:
    """``amendments.yaml``: the list of ``{time, step, epoch, changes}`` that resumes recorded ([] if none)."""
    path = Path(run_dir) / AMENDMENTS_FILE
    if not path.is_file():
        return []
    items = load_yaml(path.read_text(), path) or []
    if not isinstance(items, list) or not all(isinstance(a, dict) and isinstance(a.get("changes"), dict)
                                              for a in items):
        raise ConfigError(f"{path}: expected a list of {{time, changes: {{option: value}}}}, got {short(items)}")
    for a in items:
        check_keys(drop_removed(a["changes"], path, note))
    return items


def resume_changes(effective: dict[str, Any], requested: TrainConfig, run_dir: str | Path) -> dict[str, Any]:
    """The options ``requested`` changes on ``--resume run_dir`` relative to the run's ``effective`` options
    (:func:`read_run_config`): those in :data:`RESUME_CHANGEABLE`; anything else is a ConfigError naming
    each option and why. Per-invocation options are not compared; an architecture option left unset
    (None, ``image_size`` 0) means the run's own value."""
    base = TrainConfig.from_dict(effective).to_dict()
    changes, refused = {}, []
    for k, v in requested.to_dict().items():
        if k in PER_INVOCATION or v == base[k]:
            continue
        if (k in ARCH_FIELDS and v is None) or (k in ("image_size", "lr", "layer_decay") and v == 0) \
                or (k in ("preprocess", "amp") and v == "auto"):
            continue  # not given: the run's own (0 / auto: resolved when the run started)
        if k in RESUME_CHANGEABLE:
            changes[k] = v
        else:
            refused.append(f"--{k.replace('_', '-')} {short(base[k])} -> {short(v)} "
                           f"({RESUME_REFUSED.get(k, _RECIPE)})")
    if refused:
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUME_CHANGEABLE)
        raise ConfigError(f"--resume {run_dir} continues the run as it was started and cannot change: "
                          f"{'; '.join(refused)}. Nothing was changed. Resume without them (it may change {allowed}), "
                          f"or start a new run from its weights with --pretrained {run_dir}")
    return changes


def record_amendment(run_dir: str | Path, changes: dict[str, Any], *, step: int, epoch: int) -> Path:
    """Append ``changes`` to ``amendments.yaml`` (atomically: the whole list is rewritten)."""
    import yaml

    items = read_amendments(run_dir)
    items.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step, "epoch": epoch,
                  "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}})
    return atomic_write_text(Path(run_dir) / AMENDMENTS_FILE, yaml.safe_dump(items, sort_keys=False))


def read_resume(run_dir: Path, requested: TrainConfig, resume, log=_silent
                ) -> tuple[TrainConfig, dict[str, tuple[Any, Any]], dict[str, Any] | None]:
    """(the config to resume with, the amendments {option: (old, new)}, the saved state or None).
    Everything is checked before anything is written: refused changes, the state, the epochs.
    ``log``: the note on each saved option vitkit no longer has (dropped)."""
    effective = read_run_config(run_dir, log)
    changes = resume_changes(effective, requested, resume)
    cfg = TrainConfig.from_dict({**effective, **changes, **{k: getattr(requested, k) for k in ("out", "max_steps")}})
    saved = load_state(run_dir / STATE_NAME) if (run_dir / STATE_NAME).exists() else None
    check_resumable(saved, cfg, resume)
    if cfg.amp == "auto" and saved is not None and saved.get("amp"):  # measured when the run started: kept
        cfg = cfg.replace(amp=saved["amp"])
        log(f"amp: {'fp32' if saved['amp'] == 'off' else saved['amp'] + ' autocast'} (--amp auto: the run's own "
            f"choice, measured when it started)")
    base = TrainConfig.from_dict(effective)
    return cfg, {k: (getattr(base, k), v) for k, v in changes.items()}, saved


def check_resumable(saved: dict[str, Any] | None, cfg: TrainConfig, resume) -> None:
    if saved is None:
        return
    done = saved["epoch"]
    # An older vitkit marked a run stopped by --max-steps as finished: only the schedule's end finishes a run.
    if saved.get("finished") and done >= cfg.epochs:
        raise CheckpointError(f"{resume} already finished ({done} epochs); nothing to resume")
    if done > cfg.epochs or (done == cfg.epochs and saved["batch_pos"]):
        raise ConfigError(f"--epochs {cfg.epochs}: {resume} has already trained {done} epoch(s)"
                          + (f" and {saved['batch_pos']} step(s) of the next" if saved["batch_pos"] else ""))


def check_same_labels(saved: dict[str, Any] | None, classes, data_dir, resume) -> None:
    """A resumed run's data (e.g. a moved --data-dir) must have the classes / targets it was trained on."""
    have = list(classes) if classes else None
    if saved is not None and saved.get("labels") is not None and list(saved["labels"]) != have:
        raise ConfigError(f"--resume {resume}: the data at --data-dir {data_dir} has the classes "
                          f"{_names(have)}; the run was trained on {_names(saved['labels'])}")


def _names(labels) -> str:
    return "none" if not labels else str(list(labels)[:12])[:-1] + (", ...]" if len(labels) > 12 else "]")

"""vitkit train: train a ViT (default: scikit-learn's 8x8 digits, no download) and write a run dir."""

from __future__ import annotations

HELP = "train a ViT (default: the 8x8 digits that ship with scikit-learn) and write a run directory"
DESCRIPTION = """Train a Vision Transformer. With no arguments: the digits recipe (under a minute on 2 CPU cores).
Options come from the defaults, then --config FILE (yaml or json), then the --key value flags below.
The run directory (--out: new or empty; default a fresh runs/<timestamp>-<suffix>; --overwrite replaces a
run there) belongs to this run alone (locked while it runs) and receives config.yaml, metrics.jsonl, summary.json,
best/ and last/ (vitkit models: `vitkit predict --model RUN_DIR img.png`), train_state.pt (for --resume),
curves.png and confusion_matrix.png. SIGINT/SIGTERM saves the state and exits non-zero; continue with
--resume RUN_DIR. Multi-process: torchrun --nproc_per_node N -m vitkit train ... (see docs/training.md)."""


def add_arguments(p) -> None:
    import argparse
    import dataclasses
    import typing

    from ..train.config import TrainConfig
    from ..train.options import resolve_annotation

    p.add_argument("--config", metavar="FILE", help="yaml or json file of training options (flags below override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue an interrupted run from RUN_DIR/train_state.pt with its saved config (a run stopped before its "
        "first checkpoint starts again from the beginning). It may change only " + resume_changeable() + "; each "
        "change is recorded in RUN_DIR/amendments.yaml (config.yaml is never rewritten). Options that change the "
        "model's shapes, the data or the recipe (--dim, --dataset, --batch-size, --seed, ...) are refused"))
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_ = f.metadata.get("help", f.name).replace("%", "%%")  # argparse %-formats help strings
        if default is not None and "(default" not in help_:  # each default said once (see cli.main.HelpFormatter)
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_ += f" (default: {shown})"
        tp = resolve_annotation(f.type)
        is_bool = tp is bool or bool in typing.get_args(tp)
        # default=SUPPRESS: only the flags the user passed reach the config (explicit values matter,
        # e.g. architecture flags with --pretrained are an error, not silently ignored)
        if is_bool:
            # --progress, --progress false (as many tools spell it; TrainConfig checks the word) and --no-progress
            off = "--no-" + flag[2:]
            p.add_argument(flag, dest=f.name, nargs="?", const=True, default=argparse.SUPPRESS, metavar="BOOL",
                           help=f"{help_}; {flag} false or {off} turns it off")
            p.add_argument(off, dest=f.name, action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif isinstance(default, tuple):
            p.add_argument(flag, dest=f.name, nargs=len(default), default=argparse.SUPPRESS, metavar="X", help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.split("_")[-1].upper(),
                           help=help_)


def resume_changeable() -> str:
    from ..train.resume import RESUME_CHANGEABLE

    return ", ".join("--" + k.replace("_", "-") for k in RESUME_CHANGEABLE)


def config_from_args(args):
    """TrainConfig from defaults <- --config file <- flags (type-checked by TrainConfig). On --resume the
    base is the run's effective config (config.yaml + amendments.yaml); train() refuses what may not change."""
    from ..train.config import TrainConfig, field_names, read_config_file
    from ..train.resume import read_run_config

    flags = {k: getattr(args, k) for k in field_names() if hasattr(args, k)}
    base: dict = {}
    if getattr(args, "resume", None):
        base = read_run_config(args.resume)
    if getattr(args, "config", None):
        base.update(read_config_file(args.config))  # drops out / overwrite: a recipe never says where to write
    return TrainConfig.from_dict({**base, **flags})


def next_steps(summary: dict) -> str:
    """What to try after a run (the demo's last words): commands to paste, paths shell-quoted, on an
    image of the run's own data (``example_image``; the digits recipe: a built-in digit)."""
    import shlex

    run = shlex.quote(summary["run_dir"])
    if summary["dataset"] == "digits":
        img, what = "digits:5", "digits:5 is a built-in digit"
    elif summary.get("example_image"):
        img, what = shlex.quote(summary["example_image"]), f"one of this run's {summary.get('test_split', 'test')} images"
    else:  # data with no files to name (tensors, a Hugging Face dataset, shards)
        img, what = "IMAGE.png", "IMAGE.png: one of your images"
    cmds = [(f"vitkit predict --model {run} {img}", f"classify an image ({what})"),
            (f"vitkit explain --model {run} {img}", "what the model looks at (report.html + explore.html)"),
            (f"vitkit eval --model {run}", "test-split report + confusion matrix"),
            ("vitkit train --dataset imagefolder --data-dir DIR",
             "your own images: DIR/train/<class>/*.jpg (see docs/training.md)")]
    width = max(len(c) for c, _ in cmds)
    lines = ["", "next:"] + [f"  {c:<{width}}  # {why}" for c, why in cmds]
    return "\n".join(lines)


def run(args) -> int:
    import signal

    from ..train.loop import TrainingInterrupted, train

    cfg = config_from_args(args)
    try:
        summary = train(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        import sys

        print(f"vitkit train: {e}", file=sys.stderr)
        return 130 if e.signum == signal.SIGINT else 128 + e.signum
    import os

    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 only
        print(next_steps(summary))
    return 0

"""vitkit train: train a ViT (default: scikit-learn's 8x8 digits, no download) and write a run dir."""

from __future__ import annotations

HELP = "train a ViT (default: the 8x8 digits that ship with scikit-learn) and write a run directory"
DESCRIPTION = """Train a Vision Transformer. With no arguments: the digits recipe (about a minute on 2 CPU cores).
Options come from the defaults, then --config FILE (yaml or json), then the --key value flags below.
The run directory (--out: new or empty; default a fresh runs/<timestamp>-<suffix>; --overwrite replaces a
run there) belongs to this run alone (locked while it runs) and receives config.yaml, metrics.jsonl, summary.json,
best/ and last/ (vitkit models: `vitkit predict --model RUN_DIR img.png`), train_state.pt (for --resume),
curves.png and confusion_matrix.png. SIGINT/SIGTERM saves the state and exits non-zero; continue with
--resume RUN_DIR. Multi-process: torchrun --nproc_per_node N -m vitkit train ... (see docs/training.md)."""


def add_arguments(p) -> None:
    import argparse
    import dataclasses

    from ..train.config import TrainConfig

    p.add_argument("--config", metavar="FILE", help="yaml or json file of training options (flags below override it)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from RUN_DIR/train_state.pt with its saved config")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_ = f.metadata.get("help", f.name)
        if default is not None and "default" not in help_:  # each default said once (see cli.main.HelpFormatter)
            help_ += f" (default: {default if not isinstance(default, tuple) else ' '.join(map(str, default))})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_)
        elif isinstance(default, tuple):
            p.add_argument(flag, dest=f.name, nargs=len(default), default=argparse.SUPPRESS, metavar="X", help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.split("_")[-1].upper(),
                           help=help_)


def config_from_args(args):
    """TrainConfig from defaults <- --config file <- flags (type-checked by TrainConfig)."""
    from pathlib import Path

    from ..train.config import TrainConfig, field_names, read_config_file
    from ..train.loop import CONFIG_FILE

    flags = {k: getattr(args, k) for k in field_names() if hasattr(args, k)}
    base: dict = {}
    if getattr(args, "resume", None):
        saved = Path(args.resume) / CONFIG_FILE
        if not saved.is_file():
            from ..errors import CheckpointError

            raise CheckpointError(f"--resume {args.resume}: no {CONFIG_FILE} there (not a vitkit training run)")
        base = read_config_file(saved, note=lambda msg: None)  # the run dir is --resume's argument
    if getattr(args, "config", None):
        base.update(read_config_file(args.config))
    return TrainConfig.from_dict({**base, **flags})


def run(args) -> int:
    import signal

    from ..train.loop import TrainingInterrupted, train

    cfg = config_from_args(args)
    try:
        train(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        import sys

        print(f"vitkit train: {e}", file=sys.stderr)
        return 130 if e.signum == signal.SIGINT else 128 + e.signum
    return 0

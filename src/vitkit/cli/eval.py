"""vitkit eval: top-1 / top-5 / loss / per-class P-R-F1 and a confusion-matrix PNG (or MAE / RMSE / R^2)."""

from __future__ import annotations

HELP = "evaluate a model (run dir, vitkit dir or pretrained source) on a dataset split"


def add_arguments(p) -> None:
    from ..data.registry import dataset_names

    p.add_argument("--model", required=True, help="training run dir, vitkit model dir, or a source from_pretrained accepts")
    p.add_argument("--dataset", choices=dataset_names(), metavar="NAME",
                   help=f"one of {', '.join(dataset_names())}. Default: a training run's own dataset (from its "
                        "config.yaml, with its data dir and split settings), else digits")
    p.add_argument("--data-dir", help="dataset location (see `vitkit train --help`); default: the run's own")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--workers", type=int, help="DataLoader worker processes for file datasets "
                                                "(default: CPU cores per local rank - 1, at most 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="folder for confusion_matrix_eval.png and eval.json (default: the run dir, "
                                 "else the current folder)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")
    from .predict import add_dtype_argument

    add_dtype_argument(p)


def data_spec(args, model_config):
    """The DataSpec to evaluate on: the run's own data (its config.yaml) unless --dataset says
    otherwise; the input size is always the model's."""
    from pathlib import Path

    from ..data import DataSpec
    from ..errors import ConfigError
    from ..train.config import read_config_file

    H, W = model_config.image_hw
    if H != W:
        raise ConfigError(f"eval needs a square model input for built-in datasets, got {H}x{W}")
    saved = Path(args.model) / "config.yaml"
    run_cfg = read_config_file(saved) if saved.is_file() else {}
    same = args.dataset is None or args.dataset == run_cfg.get("dataset")
    base = dict(run_cfg) if same and run_cfg else {}
    base.pop("subset", None)  # evaluate the whole split even when the run trained on a subset
    if args.dataset is not None:
        base["dataset"] = args.dataset
    if args.data_dir is not None:
        base["data_dir"] = args.data_dir
    return DataSpec.from_config(base, image_size=H, skip_bad_images=args.skip_bad_images)


def run(args) -> int:
    import json
    from pathlib import Path

    import vitkit

    from ..data import build_data
    from ..errors import ConfigError
    from ..eval.evaluate import evaluate_model
    from ..io import atomic_write_text
    from ..train.build import pick_device
    from ..train.plots import plot_confusion

    device = pick_device(args.device)
    model = vitkit.from_pretrained(args.model).to(device).eval()
    c = model.config
    spec = data_spec(args, c)
    splits = build_data(spec)
    name = spec.dataset
    if splits.in_channels != c.in_channels:
        raise ConfigError(f"model expects {c.in_channels} input channel(s), {name} has {splits.in_channels}")
    if splits.num_outputs != c.num_classes:
        raise ConfigError(f"model has {c.num_classes} outputs, {name} has {splits.num_outputs} "
                          f"{'classes' if splits.task == 'classification' else 'targets'}")
    from ..infer import Predictor

    r = evaluate_model(model, splits, args.split, batch_size=args.batch_size, device=device, progress=True,
                       workers=args.workers, forward=Predictor(model, args.dtype))
    r["dtype"] = args.dtype
    r = {"model": str(args.model), "dataset": name, "data_dir": spec.data_dir, "split": args.split, **r}
    src = Path(args.model)
    out = Path(args.out) if args.out else (src if src.is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    if splits.task == "classification":
        png = plot_confusion(r["confusion_matrix"], splits.classes, out / "confusion_matrix_eval.png",
                             title=f"{name} {args.split}, accuracy {r['accuracy']:.4f}")
        r["confusion_png"] = str(png)
    atomic_write_text(out / "eval.json", json.dumps(r, indent=2) + "\n")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if splits.task == "classification":
        top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else ""
        print(f"{name} {args.split}: {r['count']} images  top-1 {r['accuracy']:.4f}{top5}  "
              f"loss {r['loss']:.4f}  macro-F1 {r['macro_f1']:.4f}")
        print(f"{'class':>12} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
        for pc in r["per_class"]:
            print(f"{pc['label'][:12]:>12} {pc['precision']:9.4f} {pc['recall']:7.4f} {pc['f1']:7.4f} {pc['support']:7d}")
        print(f"confusion matrix: {r['confusion_png']}")
    else:
        print(f"{name} {args.split}: {r['count']} images  MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}  "
              f"R^2 {r['r2']:.4f}  loss {r['loss']:.4f}")
    return 0

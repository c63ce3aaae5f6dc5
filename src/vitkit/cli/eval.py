"""vitkit eval: top-1 / top-5 / loss / per-class P-R-F1 and a confusion-matrix PNG (or MAE / RMSE / R^2)."""

from __future__ import annotations

HELP = "evaluate a model (run dir, vitkit dir or pretrained source) on a dataset split"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="training run dir, vitkit model dir, or a source from_pretrained accepts")
    p.add_argument("--dataset", default="digits",
                   help="digits | cifar10 | cifar100 | mnist | fashion-mnist | imagefolder | csv")
    p.add_argument("--data-dir", help="dataset location (see `vitkit train --help`)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="folder for confusion_matrix.png and eval.json (default: the run dir, "
                                 "else the current folder)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")


def run(args) -> int:
    import json
    from pathlib import Path

    import vitkit

    from ..data.datasets import build_datasets
    from ..errors import ConfigError
    from ..eval.evaluate import evaluate_model
    from ..io import atomic_write_text
    from ..train.config import TrainConfig
    from ..train.loop import pick_device
    from ..train.plots import plot_confusion

    device = pick_device(args.device)
    model = vitkit.from_pretrained(args.model).to(device).eval()
    c = model.config
    if c.image_hw[0] != c.image_hw[1]:
        raise ConfigError(f"eval needs a square model input for built-in datasets, got {c.image_hw}")
    tcfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=c.image_hw[0],
                       skip_bad_images=args.skip_bad_images, augment=False, progress=False)
    splits = build_datasets(tcfg)
    if splits.in_channels != c.in_channels:
        raise ConfigError(f"model expects {c.in_channels} input channel(s), {args.dataset} has {splits.in_channels}")
    if splits.num_outputs != c.num_classes:
        raise ConfigError(f"model has {c.num_classes} outputs, {args.dataset} has {splits.num_outputs} "
                          f"{'classes' if splits.task == 'classification' else 'targets'}")
    r = evaluate_model(model, splits, args.split, batch_size=args.batch_size, device=device, progress=True)
    r = {"model": str(args.model), "dataset": args.dataset, "split": args.split, **r}
    src = Path(args.model)
    out = Path(args.out) if args.out else (src if src.is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    if splits.task == "classification":
        png = plot_confusion(r["confusion_matrix"], splits.classes, out / "confusion_matrix_eval.png",
                             title=f"{args.dataset} {args.split}, accuracy {r['accuracy']:.4f}")
        r["confusion_png"] = str(png)
    atomic_write_text(out / "eval.json", json.dumps(r, indent=2) + "\n")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if splits.task == "classification":
        print(f"{args.dataset} {args.split}: {r['count']} images  top-1 {r['accuracy']:.4f}  top-5 {r['top5']:.4f}  "
              f"loss {r['loss']:.4f}  macro-F1 {r['macro_f1']:.4f}")
        print(f"{'class':>12} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
        for pc in r["per_class"]:
            print(f"{pc['label'][:12]:>12} {pc['precision']:9.4f} {pc['recall']:7.4f} {pc['f1']:7.4f} {pc['support']:7d}")
        print(f"confusion matrix: {r['confusion_png']}")
    else:
        print(f"{args.dataset} {args.split}: {r['count']} images  MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}  "
              f"R^2 {r['r2']:.4f}  loss {r['loss']:.4f}")
    return 0

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
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="which split to evaluate (test: the validation split when the data has none; the result "
                        "names the split read)")
    p.add_argument("--label-map", metavar="FILE_OR_MAP",
                   help="which model label each data class is, where the names differ: data_class=model_label,... "
                        "or a file (a JSON object, or one data_class=model_label per line). Without it the data's "
                        "classes are matched to the model's labels by name")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--workers", type=int, help="DataLoader worker processes for file datasets "
                                                "(default: CPU cores per local rank - 1, at most 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="folder for confusion_matrix_eval.png and eval.json (default: the run dir, "
                                 "else the current folder; never a run another process holds, nor the model "
                                 "or data read)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")
    from .predict import add_dtype_argument
    from .zeroshot import add_template_arguments

    add_dtype_argument(p)
    p.add_argument("--zeroshot", action="store_true",
                   help="no classifier needed: --model is an image-text model (CLIP, SigLIP) and the data's class "
                        "names (or their --label-map names) are its labels, as in `vitkit zeroshot`")
    add_template_arguments(p)


def data_spec(args, model_config):
    """The DataSpec to evaluate on: the run's own data (its config.yaml) unless --dataset says
    otherwise; the input size is always the model's."""
    from pathlib import Path

    from ..data import DataSpec
    from ..errors import ConfigError
    from ..train.resume import read_run_config

    H, W = model_config.image_hw
    if H != W:
        raise ConfigError(f"eval needs a square model input for built-in datasets, got {H}x{W}")
    saved = Path(args.model) / "config.yaml"
    run_cfg = read_run_config(saved.parent) if saved.is_file() else {}  # amendments (a moved --data-dir) apply
    same = args.dataset is None or args.dataset == run_cfg.get("dataset")
    base = dict(run_cfg) if same and run_cfg else {}
    base.pop("subset", None)  # evaluate the whole split even when the run trained on a subset
    if args.dataset is not None:
        base["dataset"] = args.dataset
    if args.data_dir is not None:
        base["data_dir"] = args.data_dir
    return DataSpec.from_config(base, image_size=H, skip_bad_images=args.skip_bad_images)


def _model_input(src):
    """What eval reads of --model: a run's model dir (best/ or last/), else the path given (a vitkit
    dir, or another library's dir / file)."""
    from ..interop.vitkit_format import model_dir

    return (model_dir(src) if src.is_dir() else None) or src


_BUSY_HINT = ("its results are not final: evaluate it when it has finished, or write the results elsewhere "
              "with --out DIR")


def _load_model(args, device):
    """(model, pair): the model to evaluate, and with --zeroshot the image-text pair whose image tower
    it is (its head is made from the class names once the data is known)."""
    import vitkit

    if args.zeroshot:
        from ..features.zeroshot import load_pair

        pair = load_pair(args.model, needed_for="vitkit eval --zeroshot", tokenizer=args.tokenizer, device=str(device))
        return pair.vision, pair
    return vitkit.from_pretrained(args.model).to(device).eval(), None


def _write_results(r: dict, out, src, spec, task: str) -> None:
    """eval.json (and the confusion-matrix PNG) into ``out``, adding r["confusion_png"]."""
    from ..io import atomic_write_text
    from ..output import claim_output, json_text
    from ..train.plots import plot_confusion

    # eval adds its two files beside what is there (update); never into a run another process holds,
    # never over a file vitkit did not write, never onto the model or the data it read
    # (in its own run, eval's two names are vitkit's even where an older vitkit wrote them unrecorded)
    inputs = [spec.data_dir, _model_input(src)]
    own = ("eval.json", "confusion_matrix_eval.png") if out == src else ()
    with claim_output(out, command="eval", update=True, inputs=inputs, own=own, busy_hint=_BUSY_HINT) as claimed:
        if task == "classification":
            png = plot_confusion(r["confusion_matrix"], r["labels"], claimed.file("confusion_matrix_eval.png"),
                                 title=f"{spec.dataset} {r['split']}, accuracy {r['accuracy']:.4f}")
            r["confusion_png"] = str(png)
        atomic_write_text(out / "eval.json", json_text(r) + "\n")


def _print_summary(r: dict, name: str, task: str) -> None:
    if task == "classification":
        top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else ""
        print(f"{name} {r['split']}: {r['count']} images  top-1 {r['accuracy']:.4f}{top5}  "
              f"loss {r['loss']:.4f}  macro-F1 {r['macro_f1']:.4f}")
        print(f"{'class':>12} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
        for pc in r["per_class"]:
            print(f"{pc['label'][:12]:>12} {pc['precision']:9.4f} {pc['recall']:7.4f} {pc['f1']:7.4f} {pc['support']:7d}")
        print(f"confusion matrix: {r['confusion_png']}")
    else:
        print(f"{name} {r['split']}: {r['count']} images  MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}  "
              f"R^2 {r['r2']:.4f}  loss {r['loss']:.4f}")


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..data import build_data
    from ..data.labels import parse_label_map
    from ..errors import ConfigError
    from ..eval.evaluate import evaluate_model
    from ..output import json_text, refuse_if_busy
    from ..train.build import pick_device
    from ..train.rundir import holds_run

    device = pick_device(args.device)
    label_map = parse_label_map(args.label_map)
    src = Path(args.model)
    out = Path(args.out) if args.out else (src if holds_run(src) else Path("."))
    refuse_if_busy(out, _BUSY_HINT)  # a run still training: refused now, not after the evaluation
    model, pair = _load_model(args, device)
    c = model.config
    spec = data_spec(args, c)
    splits = build_data(spec)
    name = spec.dataset
    if splits.in_channels != c.in_channels:
        raise ConfigError(f"model expects {c.in_channels} input channel(s), {name} has {splits.in_channels}")
    from ..infer import Predictor

    forward = Predictor(model, args.dtype)
    if pair is not None:
        from ..features.zeroshot import classifier_for_classes

        model = classifier_for_classes(pair, splits, label_map, args.templates, dtype=args.dtype,
                                       note=lambda s: print(f"vitkit eval: {s}", file=sys.stderr))
        forward = model.over(forward)
    r = evaluate_model(model, splits, args.split, label_map, batch_size=args.batch_size, device=device,
                       progress=True, workers=args.workers, forward=forward)
    if r.get("label_note"):
        print(f"vitkit eval: {r['label_note']}", file=sys.stderr)
    r["dtype"] = args.dtype
    if pair is not None:
        r["zeroshot"] = {"templates": args.templates, "probabilities": "softmax" if pair.loss == "softmax" else "sigmoid"}
    r = {"model": str(args.model), "dataset": name, "data_dir": spec.data_dir, **r}  # r["split"]: the split read
    _write_results(r, out, src, spec, splits.task)
    if args.json:
        print(json_text(r))
        return 0
    _print_summary(r, name, splits.task)
    return 0

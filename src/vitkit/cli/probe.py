"""vitkit probe: linear-probe accuracy of a model's frozen features (logistic regression)."""

from __future__ import annotations

HELP = "linear-probe accuracy of a model's frozen features on a labelled dataset"
DESCRIPTION = ("Multinomial logistic regression (scikit-learn) on frozen features: fit on train, the "
               "regularisation C chosen from a small sweep by top-1 on the validation split, scored on the test "
               "split (top-1, and top-5 with more than 5 classes). C is never chosen on the scored split: without "
               "a validation split part of train is held out for it (--val-fraction, --seed); without a test "
               "split the validation split is scored. The result names both.")


def add_arguments(p) -> None:
    from .embed import add_dataset_arguments, add_feature_arguments

    p.add_argument("--model", "-m", required=True, help="model source: vitkit dir, run dir, checkpoint or hub id")
    add_dataset_arguments(p, required=True)
    p.add_argument("--C", dest="cs", default="0.01,0.1,1,10,100",
                   help="comma-separated inverse regularisation strengths to sweep")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    add_feature_arguments(p)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the features first")
    p.add_argument("--json", action="store_true", help="print the result as JSON (keys top1, top5, C, sweep, ...)")


def run(args) -> int:
    from ..errors import ConfigError
    from ..features import FeatureSpec, probe_on_dataset
    from ..output import json_text
    from .embed import dataset_options, model_and_source, print_skipped

    try:
        cs = [float(c) for c in args.cs.split(",") if c.strip()]
    except ValueError as e:
        raise ConfigError(f"--C expects comma-separated numbers, got {args.cs!r}") from e
    if not cs or min(cs) <= 0:
        raise ConfigError(f"--C expects positive numbers, got {args.cs!r}")
    model, _ = model_and_source(args)
    spec = FeatureSpec(pool=args.pool, layers=args.layers, normalize=args.normalize, dtype=args.dtype)
    r = probe_on_dataset(model, args.dataset, data_dir=args.data_dir, Cs=cs, spec=spec, batch_size=args.batch_size,
                         workers=args.workers, progress=not args.json, max_iter=args.max_iter,
                         **dataset_options(args))
    skipped, r["skipped"] = r["skipped"], len(r["skipped"])
    if args.json:
        print(json_text({"model": str(args.model), "dataset": args.dataset, **r}))
    else:
        for s in r["sweep"]:
            print(f"  C={s['C']:<8g} {r['select_split']} top-1 {s['val_top1']:.4f}"
                  + ("" if s["converged"] else "  (not converged)"))
        top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else f"  ({r['top5_note']})"
        print(f"{args.dataset} {r['split']} split: linear probe (C={r['C']:g}, chosen on the {r['select_split']} "
              f"split) on {r['train_count']} train images, {r['count']} scored: top-1 {r['top1']:.4f}{top5}")
    print_skipped("probe", [(p, "unreadable") for p in skipped])
    return 0

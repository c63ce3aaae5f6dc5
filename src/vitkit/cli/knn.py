"""vitkit knn: weighted k-NN accuracy of a model's frozen features (the DINO evaluation)."""

from __future__ import annotations

HELP = "k-NN accuracy of a model's frozen features on a labelled dataset (DINO protocol)"
DESCRIPTION = ("Weighted k-NN classifier of the DINO papers: L2-normalised features, the train split as memory, "
               "the k most similar training images vote with weight exp(cosine / temperature); top-1 (and top-5 "
               "with more than 5 classes) on the test split (the validation split when there is none; the "
               "result names the split read).")


def add_arguments(p) -> None:
    from .embed import add_dataset_arguments, add_feature_arguments

    p.add_argument("--model", "-m", required=True, help="model source: vitkit dir, run dir, checkpoint or hub id")
    add_dataset_arguments(p, required=True)
    p.add_argument("--k", type=int, default=20, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / temperature)")
    add_feature_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (keys top1, top5, ...)")


def run(args) -> int:
    from ..features import FeatureSpec, knn_on_dataset
    from ..output import json_text
    from .embed import dataset_options, model_and_source, print_skipped

    model, _ = model_and_source(args)
    spec = FeatureSpec(pool=args.pool, layers=args.layers, normalize=True, dtype=args.dtype)
    r = knn_on_dataset(model, args.dataset, data_dir=args.data_dir, k=args.k, temperature=args.temperature, spec=spec,
                       batch_size=args.batch_size, workers=args.workers, progress=not args.json,
                       **dataset_options(args))
    skipped, r["skipped"] = r["skipped"], len(r["skipped"])
    if args.json:
        print(json_text({"model": str(args.model), "dataset": args.dataset, **r}))
    else:
        top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else f"  ({r['top5_note']})"
        print(f"{args.dataset} {r['split']} split: k-NN (k={r['k']}, T={r['temperature']}) over {r['train_count']} "
              f"train images, {r['count']} scored: top-1 {r['top1']:.4f}{top5}")
    print_skipped("knn", [(p, "unreadable") for p in skipped])
    return 0

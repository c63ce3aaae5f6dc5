"""vitkit zeroshot: classify images by label names with an image-text model (CLIP, SigLIP), no training."""

from __future__ import annotations

HELP = "classify images by label names with an image-text model (CLIP, SigLIP): no training"
DESCRIPTION = ("Zero-shot classification: each label is put into prompt templates, embedded by the model's text "
               "tower (normalised, averaged over the templates, normalised again: CLIP's recipe) and used as a linear "
               "head on the normalised image embeddings, scaled by the model's logit scale (plus SigLIP's bias). "
               "Probabilities are a softmax over the labels for CLIP and each label's own sigmoid for SigLIP (they "
               "need not sum to 1). Images are read with the image tower's own preprocessing; unreadable files "
               "are reported and skipped (exit status 1).")


def add_template_arguments(p) -> None:
    """--templates / --tokenizer (shared with `vitkit eval --zeroshot`)."""
    p.add_argument("--templates", default="simple", metavar="simple|imagenet|imagenet7|TEMPLATE|FILE",
                   help="prompts each label is put into: simple = 'a photo of a {}.'; imagenet = CLIP's 80 ImageNet "
                        "prompts, averaged per class; imagenet7 = the 7 of CLIP's notebook; a text holding {} is "
                        "one template ('{}' = the bare label); else a file with one template a line (default: simple)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer files for checkpoints that ship none (OpenAI / OpenCLIP state dicts, big_vision "
                        ".npz): a folder with tokenizer.json, vocab.json + merges.txt or spiece.model, or open_clip's "
                        "bpe_simple_vocab_16e6.txt.gz")


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or folders (recursive, sorted), or built-ins sample:china.jpg, digits:N")
    p.add_argument("--model", "-m", required=True,
                   help="image-text model: transformers CLIP / SigLIP / SigLIP2 dir, OpenAI / OpenCLIP checkpoint, "
                        "big_vision SigLIP .npz, vitkit image-text dir, or a hub id of one")
    p.add_argument("--labels", "-l", default=None, help="class names, comma-separated: cat,dog,car")
    p.add_argument("--labels-file", default=None, help="class names, one a line")
    add_template_arguments(p)
    p.add_argument("--top-k", "-k", type=int, default=5, help="labels shown per image")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes that decode images")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="precision of both towers (vitkit.infer.Predictor): the images and the label embeddings")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from ..features.zeroshot import classify_files, load_pair, read_labels
    from .predict import image_inputs

    labels = read_labels(args.labels, args.labels_file)  # checked before the model is read
    notes: list[str] = []

    def note(s: str) -> None:
        notes.append(s)
        print(f"vitkit zeroshot: {s}", file=sys.stderr)

    model = load_pair(args.model, needed_for="vitkit zeroshot", tokenizer=args.tokenizer, device=args.device)
    files = image_inputs(args.images)
    results = classify_files(model, files, labels, args.templates, top_k=args.top_k, batch_size=args.batch_size,
                             workers=args.workers, dtype=args.dtype, progress=len(files) > args.batch_size and not args.json,
                             note=note)
    failed = [r for r in results if "error" in r]
    if args.json:
        doc = {"model": str(args.model), "probabilities": "softmax" if model.loss == "softmax" else "sigmoid",
               "labels": labels, "templates": args.templates, "results": results, "notes": notes}
        print(json.dumps(doc, indent=2, allow_nan=False))
    else:
        folder = any(Path(s).is_dir() for s in args.images)
        for r in results:
            if "error" in r:
                continue
            if folder:  # a folder's images: one line each
                print(f"{r['file']}  " + "  ".join(f"{p['label']} {p['prob']:.4f}" for p in r["predictions"]))
                continue
            print(r["file"])
            width = max(len(p["label"]) for p in r["predictions"])
            for rank, p in enumerate(r["predictions"], 1):
                print(f"  {rank:>2}. {p['label']:<{width}}  {p['prob']:.4f}")
    for r in failed:
        print(f"vitkit zeroshot: error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0

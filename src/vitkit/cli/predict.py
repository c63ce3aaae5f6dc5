"""vitkit predict: top-k labels with probabilities for image files, batched, with the model's own
preprocessing. A file that cannot be read gets a clear error line and the others still run; the
exit status is 1 when any file failed."""

from __future__ import annotations

HELP = "classify images with a model (top-k labels + probabilities, or regression outputs)"
DESCRIPTION = ("Classify image files with any loadable model (vitkit dir, training run dir, timm / Hugging Face / "
               "torchvision / JAX checkpoint, hub id). Unreadable files are reported and skipped; exit status 1 "
               "if any file failed.")


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or folders (a folder's images, recursively, sorted, one line each), or "
                        "built-ins sample:china.jpg, sample:flower.jpg, digits:N")
    p.add_argument("--model", "-m", default=None,
                   help="model source: vitkit dir, run dir, checkpoint file/dir or hub id (default: latest run in runs/)")
    p.add_argument("--top-k", "-k", type=int, default=5, help="how many classes to show per image")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels than this (default: VITKIT_MAX_IMAGE_PIXELS, else 100 megapixels)")
    from ..interop.formats import READ_FORMATS

    p.add_argument("--format", default=None, choices=READ_FORMATS,
                   help="the format of the model you READ (default: detected from its files; predict writes no model)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, for checkpoints that cannot say")
    from .embed import add_image_size_argument

    add_image_size_argument(p)
    add_dtype_argument(p)
    p.add_argument("--calibration", metavar="DIR", default=None,
                   help="--dtype int8: the real images its static quantization is calibrated on (the first 64 of DIR, "
                        "recursively, sorted; default: the first 64 readable input images). The quantized model is "
                        "built once per run (tens of seconds for a ViT-S on 2 cores)")


def add_dtype_argument(p) -> None:
    """``--dtype`` as predict and explain take it (see vitkit.infer.Predictor)."""
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="inference precision (vitkit.infer.Predictor): fp32 (within 1e-5 of the model's forward); bf16 (CPUs with native "
                        "bf16, else fp32 with a note; GPUs) and int8 (CPU: static quantization on the CPU's int8 units where it "
                        "has them and vitkit[int8] is installed, else bf16 / fp32 with a note) are faster "
                        "approximations, see docs/inference.md for their agreement with fp32")


def _output_kind(model) -> tuple[bool, bool, list[str] | None]:
    """(classify, embedding, output names): what a row of the model's output is. Embedding models
    (CLIP, SigLIP, DINOv2, num_classes 0) give {"file", "embedding", "dim", "norm"}, never a softmax
    over embedding dimensions."""
    from ..interop.labels import embedding_output, output_names

    cfg = model.config
    embedding = embedding_output(model)
    classify = cfg.task == "classification" and cfg.num_classes > 0 and not embedding
    names = output_names(model) if not classify and cfg.num_classes > 0 and not embedding else None
    return classify, embedding, names


def _row_result(result: dict, row, file, kind: tuple[bool, bool, list[str] | None], top_k: int,
                labels) -> None:
    """Fill one file's ``result`` from its output ``row`` (K,)."""
    import torch

    classify, embedding, names = kind
    bad = int((~torch.isfinite(row)).sum())
    if bad:  # no probability or vector can be read from NaN / inf (weights are checked finite at load)
        result["error"] = (f"{file}: the model's output for it is not finite ({bad} of {row.numel()} "
                           "values are NaN or inf); nothing to report")
        return
    if classify:
        probs = row.softmax(-1)
        p, c = probs.topk(min(top_k, probs.numel()))
        result["predictions"] = [
            {"index": int(ci), "label": labels[int(ci)] if labels else f"class_{int(ci)}", "prob": float(pi)}
            for pi, ci in zip(p, c)]
    elif embedding:
        result.update(dim=row.numel(), norm=float(row.norm()), embedding=[float(v) for v in row])
    else:
        result["outputs"] = [float(v) for v in row]
        if names is not None:
            result["names"] = names


def predict_files(model, files, top_k: int = 5, batch_size: int = 32, max_pixels: int | None = None,
                  progress: bool = False, dtype: str = "fp32", calibration: str | None = None) -> list[dict]:
    """One result dict per file, in order: {"file", "predictions": [{"index","label","prob"}]} for
    classifiers, {"file", "outputs": [...]} for regression / feature models, {"file", "error"} on failure.
    The forward runs through ``vitkit.infer.Predictor(model, dtype)``; int8 is calibrated on the first
    64 images of the folder ``calibration``, else on the first 64 readable ``files``."""
    import torch

    from ..data.image import load_image
    from ..data.transforms import eval_transform
    from ..errors import InputError
    from ..infer import Predictor
    from ..model.naflex import naflex_transform
    from ..preprocess import Preprocess
    from ..progress import progress_bar

    if top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    cfg = model.config
    naflex = naflex_transform(model)  # NaFlex: each image at its own aspect ratio, packed with a mask
    transform = naflex or eval_transform(Preprocess.of(model))
    mode = "L" if cfg.in_channels == 1 else "RGB"
    calib = None
    if dtype == "int8" and not naflex:  # NaFlex batches run the model's own forward (fp32)
        from ..features.inputs import list_images
        from ..infer.int8 import CALIBRATION_IMAGES, load_images

        if calibration is not None:
            paths = list_images([calibration])[0]
            if not paths:
                raise InputError(f"--calibration {calibration}: no image files in it")
            calib = load_images(paths, model, limit=CALIBRATION_IMAGES)
        else:
            try:
                calib = load_images(files, model, limit=CALIBRATION_IMAGES, skip_unreadable=True)
            except InputError:  # no input is readable: each file reports its own error below
                calib = None
    predictor = Predictor(model.eval(), dtype, calibration=calib)
    results: list[dict] = [{"file": str(f)} for f in files]
    pending: list[tuple[int, torch.Tensor]] = []
    kind = _output_kind(model)
    labels = model.labels

    def flush() -> None:
        if not pending:
            return
        idx, xs = zip(*pending)
        out = predictor(naflex.pack(xs) if naflex else torch.stack(xs)).cpu()
        for i, row in zip(idx, out):
            _row_result(results[i], row, files[i], kind, top_k, labels)
        pending.clear()

    for i, f in enumerate(progress_bar(files, desc="predict", unit="img", disable=not progress)):
        try:
            img = load_image(f, mode=mode, max_pixels=max_pixels)
            x = transform(img)
            if x.shape[0] != cfg.in_channels:
                raise InputError(f"{f}: preprocessing gave {x.shape[0]} channels, model expects {cfg.in_channels}")
        except (InputError, OSError, ValueError) as e:
            results[i]["error"] = str(e)
            continue
        pending.append((i, x))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from ..errors import ConfigError
    from ..io import model_source_or_latest_run
    from .embed import load_for_command

    if args.calibration is not None and args.dtype != "int8":
        raise ConfigError(f"--calibration is for --dtype int8 (its static quantization); got --dtype {args.dtype}")
    source = model_source_or_latest_run(args.model, say=lambda s: print(s, file=sys.stderr))  # stdout: --json
    kw = {"num_heads": args.num_heads} if args.num_heads else {}
    model = load_for_command("predict", source, args.image_size, device=args.device, format=args.format, **kw)
    files = image_inputs(args.images)
    results = predict_files(model, files, top_k=args.top_k, batch_size=args.batch_size,
                            max_pixels=args.max_pixels, progress=len(files) > args.batch_size and not args.json,
                            dtype=args.dtype, calibration=args.calibration)
    folder = any(Path(s).is_dir() for s in args.images)
    failed = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps({"model": str(source), "results": results}, indent=2, allow_nan=False))
    else:
        _say_embedding(model, source)
        for r in results:
            if "error" in r:
                continue
            if folder:  # a folder's images: one line each
                print(one_line(r))
                continue
            print(r["file"])
            if "embedding" in r:
                print(f"  embedding: {r['dim']}-d, L2 norm {r['norm']:.6g}")
            elif "predictions" in r:
                width = max(len(p["label"]) for p in r["predictions"])
                for rank, p in enumerate(r["predictions"], 1):
                    print(f"  {rank:>2}. {p['label']:<{width}}  {p['prob']:.4f}")
            elif "names" in r:
                width = max(len(n) for n in r["names"])
                for n, v in zip(r["names"], r["outputs"]):
                    print(f"  {n:<{width}}  {v:.6g}")
            else:
                print("  outputs: " + ", ".join(f"{v:.6g}" for v in r["outputs"]))
    for r in failed:
        print(f"vitkit predict: error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def image_inputs(specs: list[str]) -> list[str]:
    """The images to predict: files and built-ins as given (a missing one is reported in its turn),
    a folder's images as embed lists them (recursive, sorted: vitkit.features.inputs.list_images)."""
    from pathlib import Path

    from ..features.inputs import list_images

    return [f for s in specs for f in (list_images([s])[0] if Path(s).is_dir() else [s])]


def one_line(r: dict) -> str:
    """One result on one line: the file, then its top-k (label prob), embedding or outputs."""
    if "embedding" in r:
        return f"{r['file']}  embedding {r['dim']}-d, L2 norm {r['norm']:.6g}"
    if "predictions" in r:
        return f"{r['file']}  " + "  ".join(f"{p['label']} {p['prob']:.4f}" for p in r["predictions"])
    names = r.get("names") or [f"output {i}" for i in range(len(r["outputs"]))]
    return f"{r['file']}  " + "  ".join(f"{n} {v:.6g}" for n, v in zip(names, r["outputs"]))


def _say_embedding(model, source) -> None:
    """Once, before the per-image lines of an embedding model: what it outputs and where the vectors go."""
    import shlex

    from ..interop.labels import embedding_output

    if not embedding_output(model):
        return
    c = model.config
    family = (model.pretrained_info or {}).get("family")
    D = c.num_classes or c.head_hidden_dim or c.dim
    print(f"this model{f' ({family})' if family else ''} outputs {D}-d image embeddings, not class scores; "
          f"shown is each embedding's L2 norm. `vitkit predict --json` prints the vectors; "
          f"`vitkit embed IMAGES --model {shlex.quote(str(source))} --out FILE.parquet` writes them as a table for search, k-NN and "
          "probes" + (f" (its default --pool model is the {c.head_hidden_dim or c.dim}-d vector before this "
                      "model's projection head)" if c.num_classes else "") + ".")

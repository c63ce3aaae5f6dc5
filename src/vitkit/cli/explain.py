"""vitkit explain: see inside a ViT for one image (patches, tokens, position embeddings,
attention maps, rollout, attention distance, predictions) as one self-contained HTML report, and
explore.html beside it: an interactive page of every layer's and head's attention, rollout,
class attribution, token similarity and the dense-feature views (PCA, token norms, correspondence)."""

from __future__ import annotations

HELP = "explain one image: patches, tokens, position embeddings, attention maps and rollout, as an HTML report"
DESCRIPTION = (
    "Run a model on one image and write a self-contained HTML report (images embedded, opens offline) "
    "plus every figure as a PNG, and print the shape walk-through; also write explore.html, an interactive "
    "page (choose a token, layer, head and mode: attention, rollout, attribution, similarity). "
    "Without --model the most recent run "
    "of `vitkit train` (under runs/) is used."
)


def _indices(text: str | None):
    """'0,5,-1' or 'all' or None -> list of ints or None (= all)."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() == "all":
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        from ..errors import InputError

        raise InputError(f"expected comma-separated integers or 'all', got {text!r}") from e


def add_arguments(p) -> None:
    p.add_argument("image", help="image file, or a built-in image: sample:china.jpg, sample:flower.jpg, digits:N")
    p.add_argument("--model", default=None,
                   help="vitkit model directory, training run directory, or pretrained source "
                        "(default: the most recent run under --runs)")
    p.add_argument("--compare", default=None, metavar="IMAGE",
                   help="a second image: the report and explore.html add the patch correspondence from IMAGE "
                        "to it (cosine of the final-normed patch tokens) and fit the PCA jointly over both")
    p.add_argument("--runs", default="runs", help="where to look for the most recent training run")
    p.add_argument("--layers", default=None,
                   help="layers for the attention maps: comma-separated indices (negative from the end) "
                        "or 'all' (default: first, middle and last)")
    p.add_argument("--heads", default="all", help="heads for the attention maps: comma-separated indices or 'all'")
    p.add_argument("--topk", type=int, default=5, help="number of top predictions to show")
    p.add_argument("--explore-classes", type=int, default=3,
                   help="explore.html: number of top classes whose attribution (Chefer et al. 2021) is shipped")
    p.add_argument("--filters", type=int, default=28, help="number of principal components of the embedding filters")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels than this (default: VITKIT_MAX_IMAGE_PIXELS, else 100 megapixels)")
    p.add_argument("--out", default=None,
                   help="output directory for report.html, explore.html and the PNG figures (default: explain_out, "
                        "whose earlier report is replaced); an existing non-empty --out is refused without --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what vitkit wrote in --out (files vitkit did not write are kept)")
    p.add_argument("--device", default="cpu", help="torch device")
    from .embed import add_image_size_argument
    from .predict import add_dtype_argument

    add_image_size_argument(p)
    p.add_argument("--size", type=int, nargs="+", metavar=("H", "W"), default=None,
                   help="the same as --image-size (explain's name for it before the other commands took it)")
    add_dtype_argument(p)  # the predictions; attention maps always come from the model's fp32 explicit path


def run(args) -> int:
    from pathlib import Path

    from ..data.image import load_image
    from ..errors import InputError
    from ..io import model_source_or_latest_run
    from ..output import claim_output

    layers, heads = _indices(args.layers), _indices(args.heads)
    if args.topk < 1:
        raise InputError(f"--topk must be >= 1, got {args.topk}")
    if args.explore_classes < 1:
        raise InputError(f"--explore-classes must be >= 1, got {args.explore_classes}")
    source = model_source_or_latest_run(args.model, args.runs, say=print)
    # check the image before loading a (possibly large) model
    probe = load_image(args.image, mode=None, max_pixels=args.max_pixels)
    probe_b = None if args.compare is None else load_image(args.compare, mode=None, max_pixels=args.max_pixels)
    # explain_out, the default, holds the latest report: an earlier one there is replaced
    out_dir = args.out or "explain_out"
    with claim_output(out_dir, command="explain", overwrite=args.overwrite or args.out is None,
                      inputs=[args.image, source] + ([args.compare] if args.compare else [])):
        _explain(args, source, probe, probe_b, layers, heads, Path(out_dir))
    return 0


def _explain(args, source: str, probe, probe_b, layers, heads, out_dir) -> None:
    from pathlib import Path

    import torch

    from ..errors import ConfigError
    from ..infer import Predictor
    from ..viz.report import _predictions, explain, prepare_image, write_report
    from .embed import load_for_command

    if args.size and args.image_size and args.size != args.image_size:
        raise ConfigError(f"--size {' '.join(map(str, args.size))} and --image-size "
                          f"{' '.join(map(str, args.image_size))} disagree; give one")
    flag = "--size" if args.size else "--image-size"
    model = load_for_command("explain", source, args.size or args.image_size, device=torch.device(args.device),
                             flag=flag)
    size_note = flag if args.size or args.image_size else "the model's preprocessing"
    mode = "L" if model.config.in_channels == 1 else "RGB"
    img = probe.convert(mode)
    img_b = None if probe_b is None else probe_b.convert(mode)
    ex = explain(model, img, layers=layers, heads=heads, topk=args.topk, filters=args.filters, compare=img_b)
    # The predictions come from the Predictor at the asked precision (fp32: the same numbers as
    # the explicit path); the maps need the attention weights, which only the model returns.
    predictor = Predictor(model, args.dtype)
    x, _ = prepare_image(model, img)
    ex.predictions, ex.regression = _predictions(model, predictor(x), args.topk)
    ex.info["predictions"] = f"{predictor.dtype} ({predictor.path})"
    ex.info["source"] = str(args.image)
    ex.info["model source"] = source
    c = model.config
    print(f"Walk-through of {args.image} ({probe.size[0]}x{probe.size[1]} {probe.mode}, preprocessed to "
          f"{x.shape[-2]}x{x.shape[-1]}: {size_note}):")
    print(ex.walkthrough)
    if ex.prefix["names"] and c.num_registers:
        print("register tokens (excluded from the overlays): mean attention received per layer: "
              + ", ".join(f"{float(v):.3f}" for v in ex.prefix["from_patches"][..., 1 if c.class_token else 0:]
                          .mean(axis=(1, 2))))
    if ex.predictions:
        print("regression outputs:" if ex.regression else f"top-{len(ex.predictions)}:")
        for name, v in ex.predictions:
            print(f"  {v:8.4f}  {name}")
    html = write_report(ex, out_dir, title=f"vitkit explain: {Path(str(args.image)).name}")
    print(f"wrote {html} and {len(ex.figures)} PNG figures to {out_dir}/")
    from ..viz.explore import COMPACT_BUDGET, write_explore

    page = write_explore(model, img, out_dir, topk=args.topk, classes=args.explore_classes, compare=img_b,
                         title=f"vitkit explore: {Path(str(args.image)).name}")
    size = page.stat().st_size
    size_text = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    print(f"wrote {page} ({size_text}): interactive attention, rollout, attribution, similarity, PCA, token norms"
          + (", correspondence" if img_b is not None else "") + "; state in the URL fragment (#layer=L&head=H&patch=P&mode=M)")
    if size > COMPACT_BUDGET:
        print(f"note: explore.html is over {COMPACT_BUDGET / 1e6:g} MB (attribution already reduced to the last "
              f"layer and top class); large pages open slowly")

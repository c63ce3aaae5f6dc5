"""vitkit embed: image files / folders or a dataset -> a parquet table of feature vectors."""

from __future__ import annotations

HELP = "embed images (files, folders, or a dataset) into a parquet table of feature vectors"
DESCRIPTION = ("Embed images with any loadable model into FILE.parquet (columns path, label, embedding). Folders "
               "are searched recursively; an image inside a sub-folder gets that folder's name as its label. "
               "Each row records the file it was computed from (absolute path, size, mtime, BLAKE2b digest). "
               "Batches are written as they finish; a later run into the same table embeds only new images and "
               "files that changed since their row was made, and drops the rows of files that are gone "
               "(an interrupted run resumes the same way). Unreadable images are skipped and listed.")


def add_feature_arguments(p, pool_help: str = "") -> None:
    """--pool / --layers / --dtype / --batch-size / --workers / --device (shared by embed, knn, probe)."""
    p.add_argument("--pool", default="model", choices=["model", "head", "cls", "mean", "cls+mean"],
                   help="model = the model's own pooled output (forward_head(..., pre_logits=True)); head = what "
                        "the model returns, its head included (CLIP: the image embedding in the joint image-text "
                        "space; a classifier: its logits); cls = class token, mean = mean of the patch tokens "
                        "(both after the final norm); cls+mean = both concatenated (DINOv2 linear evaluation)"
                        + pool_help)
    p.add_argument("--layers", type=int, default=1,
                   help="pool each of the last N blocks (after the final norm) and concatenate")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="fp32 is exact; bf16 / int8 run through vitkit.infer's fast path (int8 here is dynamic "
                        "quantization of the Linears; the faster static int8, calibrated on real images, is "
                        "vitkit predict --dtype int8 and Predictor(model, 'int8', calibration=...))")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes that decode images")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    add_image_size_argument(p)


def add_image_size_argument(p, *aliases: str) -> None:
    """``--image-size H [W]`` (embed, knn, probe, predict, explain; explain's ``--size`` too)."""
    p.add_argument("--image-size", *aliases, dest="image_size", type=int, nargs="+", metavar=("H", "W"),
                   default=None,
                   help="run at this input size (H [W], multiples of the patch size): images are preprocessed to it "
                        "and the position table resampled as the weights' source does. Default: the checkpoint's "
                        "own preprocessing (DINOv2 from Hugging Face: 224, its processor's crop)")


def load_for_command(command: str, source, image_size: list[int] | None = None, device: str = "cpu",
                     format: str | None = None, flag: str = "--image-size", **hints):
    """The model of a CLI command: read ``source`` (``image_size`` also a hint for a table the
    weights cannot place), loaded at ``image_size`` when given (preprocessing to it, the table
    resampled as the source does: vitkit.from_pretrained(image_size=)), in eval mode; the load
    report's notes (they change results: a resampled table, a dropped decoder, the input size the
    checkpoint's preprocessing chose) printed once to stderr."""
    import sys

    from ..errors import InputError
    from ..interop.load import model_from_converted, read_pretrained
    from ..preprocess import Preprocess

    adapt = {}
    if image_size is not None:
        if not 1 <= len(image_size) <= 2 or min(image_size) <= 0:
            raise InputError(f"{flag} takes H [W], positive integers, got {' '.join(map(str, image_size))}")
        adapt["image_size"] = (image_size[0], image_size[-1])
    conv = read_pretrained(source, format=format, **hints, **adapt)
    if adapt:
        if getattr(conv.config, "naflex_max_patches", None):
            raise InputError(f"{flag} {' '.join(map(str, image_size))}: this NaFlex model takes each image at its own "
                             f"aspect ratio (up to {conv.config.naflex_max_patches} patches), not at one size")
        (H, W), (ph, pw) = adapt["image_size"], conv.config.patch_hw
        if H % ph or W % pw:
            raise InputError(f"{flag} {H} {W}: not a multiple of this model's patch size {ph}x{pw} (nearest: "
                             f"{max(ph, round(H / ph) * ph)} {max(pw, round(W / pw) * pw)})")
    model = model_from_converted(conv, adapt=adapt, device=device, **hints)
    if adapt:  # the size asked, also where it is the table's own and the preprocessing said another
        c = model.config
        model.preprocess_cfg = Preprocess.of(model).for_input(c.in_channels, c.image_hw)
        model.load_report.notes.append(f"running at {c.image_hw[0]}x{c.image_hw[1]} ({flag})")
    for note in model.load_report.notes:
        print(f"vitkit {command}: note: {note}", file=sys.stderr)
    return model.eval()


def add_dataset_arguments(p, required: bool = False) -> None:
    """The training options' dataset syntax (see `vitkit train --help`)."""
    from ..data.registry import dataset_names

    kw = {"required": True} if required else {"default": None}
    p.add_argument("--dataset", **kw, help=f"{' | '.join(dataset_names())}, as in vitkit train")
    p.add_argument("--data-dir", help="where the dataset files are (as in vitkit train)")
    p.add_argument("--download", action="store_true", help="download torchvision datasets into --data-dir")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held out for validation when the dataset has no val split (stratified, seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of that split")


def dataset_options(args) -> dict:
    return {"download": args.download, "val_fraction": args.val_fraction, "seed": args.seed}


def recorded_source(model: str) -> str:
    """The model source an embeddings table records: an absolute path when it names a local file or folder."""
    from pathlib import Path

    src = Path(model).expanduser()
    return str(src.resolve()) if src.exists() else str(model)


def model_and_source(args):
    """Load --model at --image-size (:func:`load_for_command`); the recorded source is :func:`recorded_source`."""
    return (load_for_command(args.command, args.model, args.image_size, device=args.device),
            recorded_source(args.model))


def print_skipped(command: str, skipped) -> None:
    import sys

    if skipped:
        print(f"vitkit {command}: skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files and/or folders (recursive)")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="embed texts instead of images: one a line, with the text tower of an image-text model "
                        "(CLIP, SigLIP); rows are named by their text; images search them with `vitkit search`")
    p.add_argument("--tokenizer", default=None,
                   help="with --text: tokenizer files for checkpoints that ship none (see `vitkit zeroshot --help`)")
    p.add_argument("--model", "-m", required=True,
                   help="model source: vitkit dir, run dir, checkpoint file/dir or hub id (recorded in the table)")
    p.add_argument("--out", "-o", required=True, help="output parquet file")
    add_dataset_arguments(p)
    add_feature_arguments(p)
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--row-group-size", type=int, default=1024,
                   help="rows per parquet row group (also how often finished rows are saved)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over instead of continuing the rows already in --out (or its .parts folder); "
                        "needed once for a table written by a vitkit that did not record the files' stamps")


def run(args) -> int:
    import sys

    from ..errors import ConfigError
    from ..features import FeatureSpec, embed_dataset, embed_files

    if args.text:
        return _run_text(args)
    if bool(args.inputs) == bool(args.dataset):
        raise ConfigError("give image files / folders, or --dataset, not both" if args.inputs else
                          "nothing to embed: give image files / folders, or --dataset NAME")
    spec = FeatureSpec(pool=args.pool, layers=args.layers, normalize=args.normalize, dtype=args.dtype)
    model, source = model_and_source(args)
    note = lambda s: print(f"vitkit embed: {s}", file=sys.stderr)  # noqa: E731
    common = dict(spec=spec, source=source, batch_size=args.batch_size, workers=args.workers,
                  row_group_size=args.row_group_size, overwrite=args.overwrite, progress=True, note=note)
    if args.dataset:
        res = embed_dataset(model, args.dataset, args.out, data_dir=args.data_dir, **common,
                            **dataset_options(args))
    else:
        res = embed_files(model, args.inputs, args.out, **common)
    print(f"{res.out}: {res.rows} rows of {res.dim}-d embeddings ({res.new_rows - res.changed_rows} new, "
          f"{res.changed_rows} changed (re-embedded), {res.gone_rows} gone (dropped), {res.resumed_rows} unchanged)")
    print_skipped("embed", res.skipped)
    return 0


def _run_text(args) -> int:
    """``--text FILE``: the text tower's embeddings (``encode_text``) as a table, in the space of the
    image tower's ``model(x)`` (``--pool head``), so image queries and image tables compare with them."""
    import sys

    from ..errors import ConfigError
    from ..features.zeroshot import embed_texts, load_pair, read_texts

    if args.inputs or args.dataset:
        raise ConfigError("--text embeds the texts of a file; give no images or --dataset with it")
    if args.pool not in ("model", "head") or args.layers != 1 or args.dtype != "fp32" or args.image_size:
        raise ConfigError("--text runs the text tower (fp32, its own pooling); --pool / --layers / --dtype / "
                          "--image-size are for images")
    texts = read_texts(args.text)
    model = load_pair(args.model, needed_for="vitkit embed --text", tokenizer=args.tokenizer, device=args.device)
    N, E = embed_texts(model, texts, args.out, source=recorded_source(args.model), normalize=args.normalize,
                       batch_size=args.batch_size, overwrite=args.overwrite, inputs=[args.text],
                       note=lambda s: print(f"vitkit embed: {s}", file=sys.stderr))
    print(f"{args.out}: {N} rows of {E}-d text embeddings")
    return 0

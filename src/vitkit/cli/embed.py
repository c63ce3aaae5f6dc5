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
                   help="fp32 is exact; bf16 / int8 run through vitkit.infer's fast path")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes that decode images")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")


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
    """Load --model; the recorded source is :func:`recorded_source`."""
    from .. import from_pretrained

    return from_pretrained(args.model, device=args.device).eval(), recorded_source(args.model)


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
    if args.pool not in ("model", "head") or args.layers != 1 or args.dtype != "fp32":
        raise ConfigError("--text runs the text tower (fp32, its own pooling); --pool / --layers / --dtype are for "
                          "images")
    texts = read_texts(args.text)
    model = load_pair(args.model, needed_for="vitkit embed --text", tokenizer=args.tokenizer, device=args.device)
    N, E = embed_texts(model, texts, args.out, source=recorded_source(args.model), normalize=args.normalize,
                       batch_size=args.batch_size, overwrite=args.overwrite, inputs=[args.text],
                       note=lambda s: print(f"vitkit embed: {s}", file=sys.stderr))
    print(f"{args.out}: {N} rows of {E}-d text embeddings")
    return 0

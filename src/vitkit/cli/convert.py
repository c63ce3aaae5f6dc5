"""vitkit convert: write vitkit's own format (config.json + model.safetensors) from any source."""

from __future__ import annotations

HELP = "convert any checkpoint vitkit reads (file, directory or hub id; the formats: --format) to vitkit's format"


def add_arguments(p) -> None:
    from ..interop.formats import READ_FORMATS, help_text

    p.add_argument("source", help="checkpoint file or directory, or a hub id (google/vit-base-patch16-224)")
    p.add_argument("out_dir", help="output directory (config.json + model.safetensors)")
    p.add_argument("--format", default=None, choices=READ_FORMATS,
                   help=f"the format of SOURCE, the checkpoint you READ (default: detected from its files; {help_text()}); "
                        "convert always writes vitkit's format")
    p.add_argument("--arch", default=None, help="preset for what the weights cannot tell (e.g. vit_base_patch16_224)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, for checkpoints that cannot say")
    p.add_argument("--act", default=None,
                   help="MLP activation when the checkpoint cannot say (OpenCLIP state dicts: quick_gelu or gelu)")
    p.add_argument("--image-size", type=int, nargs="+", metavar=("H", "W"),
                   help="resample the position embedding to this input size: H [W]")
    p.add_argument("--num-classes", type=int, default=None, help="new class count (the head is re-initialised)")
    p.add_argument("--in-channels", type=int, default=None, help="1 to sum RGB patch kernels for grey input")
    p.add_argument("--no-strict", action="store_true", help="load what matches instead of failing on a mismatch")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what vitkit wrote in OUT_DIR (files vitkit did not write are kept); without it a "
                        "non-empty OUT_DIR is refused")


def run(args) -> int:
    from .. import from_pretrained
    from ..output import claim_output

    size = None
    if args.image_size:
        if len(args.image_size) > 2:
            from ..errors import ConfigError

            raise ConfigError(f"--image-size takes 1 or 2 numbers, got {args.image_size}")
        size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    kw = {}
    if args.num_heads:
        kw["num_heads"] = args.num_heads
    if args.act:
        kw["act"] = args.act
    # claimed before the (possibly large) model loads: a refused output costs nothing
    with claim_output(args.out_dir, command="convert", overwrite=args.overwrite, inputs=[args.source]):
        model = from_pretrained(args.source, arch=args.arch, format=args.format, strict=not args.no_strict,
                                image_size=size, num_classes=args.num_classes, in_channels=args.in_channels, **kw)
        model.save_pretrained(args.out_dir)
    print(model.load_report)
    c = model.config
    print(f"wrote {args.out_dir}: {c.dim}-wide, depth {c.depth}, {c.num_heads} heads, "
          f"{c.image_hw[0]}x{c.image_hw[1]} input, {c.num_classes} classes ({model.pretrained_info['format']} source)")
    return 0

"""vitkit export: write a model as timm, Hugging Face, torchvision, JAX npz, ONNX or TorchScript."""

from __future__ import annotations

HELP = "export a model to another weight format (timm, hf, onnx...; the choices: --format)"


def add_arguments(p) -> None:
    from ..interop.formats import READ_FORMATS, REGISTRY, WRITE_FORMATS

    dirs = [f.name for f in REGISTRY if f.writes and f.writes_dir]
    files = [f.name for f in REGISTRY if f.writes and not f.writes_dir]
    p.add_argument("model", nargs="?", help="model source: vitkit dir, run dir, checkpoint file/dir or hub id")
    p.add_argument("--format", "-f", choices=WRITE_FORMATS,
                   help="the format to WRITE (the target; required, but vitkit with --merge-lora); the input's format is "
                        "detected, or forced with --source-format")
    p.add_argument("--merge-lora", metavar="RUN", default=None,
                   help="instead of MODEL: a run trained with --lora; its peft adapter (RUN/best/adapter) is loaded by "
                        "peft onto the run's --pretrained base and merged into a plain model (the same logits)")
    p.add_argument("--out", "-o", required=True,
                   help=f"output path: a directory for {'/'.join(dirs)}, a file for {'/'.join(files)}")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--layout", default="vision_transformer", choices=["vision_transformer", "big_vision", "big_vision_img"],
                   help="npz layout for --format jax (big_vision_img: under params/img/, as SigLIP's image tower)")
    p.add_argument("--source-format", default=None, choices=READ_FORMATS,
                   help="the format of the model you READ (default: detected from its files)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, for checkpoints that cannot say")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, or what vitkit wrote in an output directory (files vitkit "
                        "did not write are kept); without it an existing file or a non-empty directory is refused")
    p.add_argument("--tower", choices=["image", "text"], default="image",
                   help="of an image-text model (CLIP, SigLIP): the image tower (default; what every format holds) or "
                        "the text tower (--format onnx only: input_ids -> text_embeds, as encode_text)")
    p.add_argument("--verify", action="store_true",
                   help="for onnx: run the exported graph in onnxruntime and print the max abs difference")


def run(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..interop.formats import get
    from ..output import claim_output
    from .embed import load_for_command

    if (args.model is None) == (args.merge_lora is None):
        raise ConfigError("expected one model: MODEL or --merge-lora RUN, got "
                          + ("both" if args.model else "neither"))
    args.format = args.format or ("vitkit" if args.merge_lora else None)
    if args.format is None:
        raise ConfigError("expected --format FORMAT (the format to write), got none")
    if args.tower == "text" and (args.format != "onnx" or args.merge_lora):
        raise ConfigError(f"--tower text writes the text tower as an ONNX graph: expected --format onnx and a MODEL, "
                          f"got --format {args.format}" + (" with --merge-lora" if args.merge_lora else ""))
    kw = {"format": args.source_format} if args.source_format else {}
    if args.num_heads:
        kw["num_heads"] = args.num_heads
    kind = "dir" if get(args.format, writing=True).writes_dir else "file"
    source = args.model or args.merge_lora
    with claim_output(args.out, command="export", kind=kind, overwrite=args.overwrite, inputs=[source]):
        if args.tower == "text":
            from ..text.io import export_text_onnx, load_image_text

            out = export_text_onnx(load_image_text(args.model), args.out, opset=args.opset)
            print(f"wrote the text tower of {source} as ONNX (input_ids -> text_embeds) to {out}")
            return 0
        if args.merge_lora:
            from ..train.adapt import merge_lora_run

            model = merge_lora_run(args.merge_lora)
        else:  # the load notes printed (one says when a text tower was left out: --tower text)
            model = load_for_command("export", args.model, **kw)
        out = model.export_to(args.format, args.out, opset=args.opset, layout=args.layout)
    print(f"wrote {args.format} export of {source}{' (LoRA merged)' if args.merge_lora else ''} to {out}")
    if args.verify and args.format == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for b in (1, 3):
            x = torch.randn(b, model.config.in_channels, *model.config.image_hw)
            with torch.no_grad():
                ref = model(x).numpy()
            got = sess.run(None, {"pixel_values": x.numpy()})[0]
            print(f"onnxruntime batch {b}: max abs diff {abs(got - ref).max():.3g}")
    return 0

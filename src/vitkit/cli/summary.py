"""vitkit summary: layer table, totals and the shape walk-through of one real image, for a preset or
any model source vitkit.from_pretrained reads."""

from __future__ import annotations

HELP = "print a layer table (name, output shape, parameters) and the shape walk-through of one image"


def add_arguments(p) -> None:
    p.add_argument("name", help="preset name (vit_base_patch16_224, ViT-B/16), or any model source vitkit.from_pretrained "
                                "reads: a vitkit model or run directory, a timm / Hugging Face / torchvision / JAX "
                                "checkpoint file or directory, a hub id")
    p.add_argument("--image-size", type=int, nargs="+", metavar=("H", "W"), help="input size: H [W]")
    p.add_argument("--patch-size", type=int, nargs="+", metavar=("PH", "PW"), help="patch size: P [PW]")
    p.add_argument("--in-channels", type=int, help="number of input channels (1 for grey images)")
    p.add_argument("--num-classes", type=int, help="number of outputs (0 = features only)")
    p.add_argument("--image", default="sample:china.jpg",
                   help="image for the walk-through: a file, sample:china.jpg, sample:flower.jpg or digits:N")
    p.add_argument("--no-walkthrough", action="store_true", help="print only the layer table")


def _size(v):
    if v is None:
        return None
    if len(v) > 2:
        from ..errors import ConfigError

        raise ConfigError(f"--image-size takes 1 or 2 numbers (H [W]), got {v}")
    return v[0] if len(v) == 1 else tuple(v)


def run(args) -> int:
    from pathlib import Path

    import torch

    from .. import create_model
    from ..config import resolve_name
    from ..data.image import load_image
    from ..data.transforms import default_preprocess, eval_transform
    from ..errors import ConfigError
    from ..interop import model_from_converted, read_pretrained
    from ..interop.hub import looks_like_hub_id
    from ..summary import format_table, walkthrough

    overrides = {k: v for k, v in {"image_size": _size(args.image_size), "patch_size": _size(args.patch_size),
                                   "in_channels": args.in_channels, "num_classes": args.num_classes}.items()
                 if v is not None}
    try:
        resolve_name(args.name)
        not_preset = None
    except ConfigError as e:
        not_preset = e
    if Path(args.name).exists() or (not_preset and looks_like_hub_id(args.name)):
        if "patch_size" in overrides:
            raise ConfigError(f"--patch-size applies to a preset only: the patch size of {args.name} is fixed by its "
                              "weights")
        # as vitkit.load_model: a new size resamples the position table; the other flags change the
        # config, and weights that cannot fit it are an error naming them
        size = overrides.pop("image_size", None)
        model = model_from_converted(read_pretrained(args.name), adapt={"image_size": size} if size else {},
                                     **overrides)
    elif not_preset:
        raise ConfigError(f"{args.name}: no such file, directory or hub id, nor a preset: {not_preset}") from not_preset
    else:
        torch.manual_seed(0)
        model = create_model(args.name, **overrides)
    model.eval()
    print(format_table(model))
    if not args.no_walkthrough:
        pre = model.preprocess_cfg or default_preprocess(model.config)
        img = load_image(args.image, mode="L" if model.config.in_channels == 1 else "RGB")
        x = eval_transform(pre)(img)
        if x.shape[0] != model.config.in_channels:
            x = x[:1].expand(model.config.in_channels, -1, -1) if x.shape[0] == 1 else x.mean(0, keepdim=True)
        print(f"\nWalk-through of {args.image} ({img.size[0]}x{img.size[1]} {img.mode}, resized to "
              f"{model.config.image_hw[0]}x{model.config.image_hw[1]}):")
        print(walkthrough(model, x, labels=model.labels))
    return 0

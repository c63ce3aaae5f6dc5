"""vitkit explore: explore.html served from 127.0.0.1, each view computed on request from the model's
full-precision maps (vitkit.viz.serve); the static page of `vitkit explain` stays for sharing."""

from __future__ import annotations

HELP = "serve the interactive explorer for one image on 127.0.0.1 (each view computed on request)"
DESCRIPTION = (
    "Run a model on one image once, keep every layer's and head's maps in memory at full precision, and "
    "serve explore.html from a local HTTP server: the page asks for the one row it draws (attention, "
    "rollout, attribution, similarity), so its size does not grow with tokens squared. The page's state "
    "is in the URL fragment as for the static page. Stop with Ctrl-C."
)


def add_arguments(p) -> None:
    p.add_argument("image", help="image file, or a built-in image: sample:china.jpg, sample:flower.jpg, digits:N")
    p.add_argument("--model", default=None,
                   help="vitkit model directory, training run directory, or pretrained source "
                        "(default: the most recent run under --runs)")
    p.add_argument("--runs", default="runs", help="where to look for the most recent training run")
    p.add_argument("--compare", default=None, metavar="IMAGE", help="a second image for the correspondence view")
    p.add_argument("--topk", type=int, default=5, help="number of top predictions to show")
    p.add_argument("--explore-classes", type=int, default=3, help="number of top classes with attribution")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (the page shows your image: keep it local unless you mean to share it)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels than this (default: VITKIT_MAX_IMAGE_PIXELS, else 100 megapixels)")
    p.add_argument("--device", default="cpu", help="torch device")


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    from .. import from_pretrained
    from ..data.image import load_image
    from ..errors import InputError
    from ..io import model_source_or_latest_run
    from ..viz.serve import ExploreState, make_server

    if args.topk < 1 or args.explore_classes < 1:
        raise InputError(f"--topk and --explore-classes must be >= 1, got {args.topk} and {args.explore_classes}")
    if not 0 <= args.port < 65536:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    source = model_source_or_latest_run(args.model, args.runs, say=print)
    probe = load_image(args.image, mode=None, max_pixels=args.max_pixels)
    probe_b = None if args.compare is None else load_image(args.compare, mode=None, max_pixels=args.max_pixels)
    t = time.perf_counter()
    model = from_pretrained(source)
    model.to(torch.device(args.device)).eval()
    mode = "L" if model.config.in_channels == 1 else "RGB"
    state = ExploreState(model, probe.convert(mode), topk=args.topk, classes=args.explore_classes,
                         compare=None if probe_b is None else probe_b.convert(mode),
                         title=f"vitkit explore: {Path(str(args.image)).name}")
    try:
        server = make_server(state, args.host, args.port)
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    host, port = server.server_address[:2]
    print(f"model and maps ready in {time.perf_counter() - t:.1f} s; serving http://{host}:{port}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

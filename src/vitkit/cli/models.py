"""vitkit models: the preset table."""

from __future__ import annotations

HELP = "list the model presets with parameters and GFLOPs at their native size"


def add_arguments(p) -> None:
    p.add_argument("pattern", nargs="?", default=None,
                   help="filter: a substring (small), a shell pattern ('vit_base*') or a paper name (ViT-B/16)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--families", action="store_true",
                   help="list the model families vitkit loads exactly (DeiT, DINOv2, CLIP, SigLIP...), the "
                        "formats and hub ids they come in, what model(x) returns and which have both an image and "
                        "a text tower (zero-shot, text search), instead of the presets")


def _print_families(as_json: bool) -> int:
    from ..interop.families import families_table
    from ..output import json_text

    rows = families_table()
    if as_json:
        print(json_text(rows))
        return 0
    for r in rows:
        print(f"{r['family']}")
        print(f"  towers:     {r['towers']}")
        print(f"  model(x):   {r['returns']}")
        print(f"  preprocess: {r['preprocess']}")
        for src in r["sources"]:
            print(f"  from        {src}")
        print(f"  hub ids:    {', '.join(r['hub_ids'])}")
        for src in r["text_sources"]:
            print(f"  both from   {src}")
    both = [r["family"] for r in rows if r["text_sources"]]
    print("Load any of them with vitkit.from_pretrained(path or hub id) (the image model); see docs/weights.md. "
          f"Both towers ({', '.join(both)}): vitkit.load_image_text, `vitkit zeroshot`, `vitkit search --text`.")
    return 0


def run(args) -> int:
    from ..output import json_text

    if getattr(args, "families", False):
        return _print_families(args.json)

    from ..bench.flops import count_flops, count_params
    from ..config import PRESETS, list_models

    names = list_models(args.pattern)
    if not names:
        import sys

        print(f"vitkit models: no preset matches {args.pattern!r}; filter by a substring (small, patch16), "
              "a shell pattern ('vit_base*') or a paper name (ViT-B/16, ViT-L/16@384)", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        c = PRESETS[name]
        fl = count_flops(c)
        rows.append({"name": name, "image_size": c.image_hw[0], "patch_size": c.patch_hw[0], "dim": c.dim,
                     "depth": c.depth, "heads": c.num_heads, "params": count_params(c),
                     "gflops": round(fl["gflops"], 2), "gmacs": round(fl["gmacs"], 2)})
    if args.json:
        print(json_text(rows))
        return 0
    print(f"{'name':<26}{'size':>5}{'patch':>6}{'dim':>6}{'depth':>6}{'heads':>6}{'params':>14}{'GFLOPs':>9}{'GMACs':>8}")
    for r in rows:
        print(f"{r['name']:<26}{r['image_size']:>5}{r['patch_size']:>6}{r['dim']:>6}{r['depth']:>6}{r['heads']:>6}"
              f"{r['params']:>14,}{r['gflops']:>9.2f}{r['gmacs']:>8.2f}")
    print("GFLOPs count a multiply-add as 2 FLOPs; GMACs is the number papers often call FLOPs. "
          "Paper names work too: ViT-B/16, ViT-L/16@384.")
    return 0

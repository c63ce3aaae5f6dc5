"""Zero-shot classification and text-tower throughput: vitkit against open_clip and transformers,
with the same weights.

A random-weight OpenCLIP ViT-B/16 (``open_clip.create_model("ViT-B-16")``) is saved as open_clip
saves it (``open_clip_model.safetensors`` + ``open_clip_config.json``), loaded by vitkit
(``vitkit.load_image_text``), and written from vitkit to a transformers ``CLIPModel`` directory
(``vitkit.text.io.export_hf``): one set of weights in all three libraries. Timed, in the same
process with the same torch threads:

* images/s, zero-shot, from JPEG files to top-5 probabilities over ``--classes`` labels (the
  class head, 80 ImageNet templates per class, computed once beforehand): vitkit
  ``classify_files`` (its loader, the image tower's preprocessing, ``vitkit.infer.Predictor`` for
  bf16); open_clip and transformers each with their own image preprocessing in the same
  DataLoader arrangement (``--workers``), ``encode_image`` / ``get_image_features`` and the same head.
* texts/s, the text tower, from strings to embeddings (tokenizer included): vitkit
  ``encode_texts``; open_clip ``tokenizer`` + ``encode_text``; transformers ``CLIPTokenizer``
  (``padding=True``: it pads to the longest text, the others to 77) + ``get_text_features``.

fp32 and bf16 (vitkit: ``vitkit.infer.Predictor`` for both towers, bf16 weights on CPUs with native bf16,
else fp32 with a note; the peers:
``torch.autocast("cpu", bfloat16)``). Paired rounds: each round runs every contender once in a
rotating order; a ratio is the median over rounds of peer time / vitkit time (> 1: vitkit faster).
Agreement (fp32): the zero-shot probabilities of the three models on one preprocessed batch
(max abs difference: the weights and the head, not the resize code).

bf16: vitkit's Predictor picks its runtime by measurement (``vitkit.infer.backends``, backend "auto");
here it measures at the warm-up call (``AUTO_AFTER_S = 0``, untimed), or starts with the choice an
earlier run cached on disk (``VITKIT_BACKEND_CACHE=off`` to measure again), so the timed rounds run
the chosen runtime; the choice is printed and kept in the JSON (``vitkit_bf16_backends``).

    python benchmarks/zeroshot.py                 # ViT-B/16, 64 images, 800 texts, 5 rounds: minutes
    python benchmarks/zeroshot.py --quick         # a tiny model, seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from embed_vs_hf import (
    write_jpegs,  # the same photo-like JPEG folder (this script's directory is on sys.path)
)

CLASSES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray",
           "rooster", "hen", "ostrich")


def build_models(tmp: Path, quick: bool):
    """(open_clip model, its preprocess, its tokenizer, vitkit pair, transformers model, processor, tokenizer)."""
    import open_clip
    import transformers
    from open_clip.tokenizer import default_bpe
    from safetensors.torch import save_file

    import vitkit
    from vitkit.text.io import export_hf

    torch.manual_seed(0)
    if quick:
        cfg = {"embed_dim": 64, "quick_gelu": False,
               "vision_cfg": {"width": 64, "layers": 2, "head_width": 32, "image_size": 64, "patch_size": 16},
               "text_cfg": {"width": 64, "heads": 2, "layers": 2, "context_length": 77, "vocab_size": 49408}}
        oc = open_clip.CLIP(**cfg)
    else:
        oc = open_clip.create_model("ViT-B-16", pretrained=None)
        cfg = {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": False}
    oc = oc.eval()
    src = tmp / "open_clip"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(src / "open_clip_model.safetensors"))
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    size = cfg["vision_cfg"]["image_size"]
    oc_pre = open_clip.image_transform(size, is_train=False)
    oc_tok = open_clip.get_tokenizer("ViT-B-16")
    pair = vitkit.load_image_text(src, tokenizer=default_bpe())
    export_hf(pair, tmp / "hf")
    hf = transformers.CLIPModel.from_pretrained(str(tmp / "hf")).eval()
    hf_proc = transformers.CLIPImageProcessor.from_pretrained(str(tmp / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp / "hf"))
    return oc, oc_pre, oc_tok, pair, hf, hf_proc, hf_tok


class Files(torch.utils.data.Dataset):
    """JPEG paths -> (C, H, W) tensors through a peer's own preprocessing (PIL decode)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


def _features(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="JPEG files classified per round")
    ap.add_argument("--texts", type=int, default=800, help="texts encoded per round (the 80 templates x classes)")
    ap.add_argument("--rounds", type=int, default=5, help="paired timed rounds (after the warm-up calls)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed calls of each contender first (a bf16 Predictor picks its backend once the "
                         "walk has run a shape ~10 s: vitkit.infer.backends)")
    ap.add_argument("--batch-size", type=int, default=32, help="images or texts per forward")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader decode workers (all three libraries)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="precisions timed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, 8 images, 160 texts, 1 round: checks it runs")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.images, args.texts, args.rounds = min(args.images, 8), min(args.texts, 160), 1
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip
    import transformers

    from vitkit import cpu
    from vitkit.features.zeroshot import IMAGENET_TEMPLATES, ZeroShotHead, classify_files, encode_texts
    from vitkit.infer import backends

    backends.AUTO_AFTER_S = 0.0  # the warm-up call measures (untimed), not a timed round

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = write_jpegs(tmp / "images", args.images)
        oc, oc_pre, oc_tok, pair, hf, hf_proc, hf_tok = build_models(tmp, args.quick)
        labels = list(CLASSES)
        texts = [t.replace("{}", c) for c in labels for t in IMAGENET_TEMPLATES]
        texts = (texts * (args.texts // len(texts) + 1))[:args.texts]
        head = ZeroShotHead(pair, labels, "imagenet")  # (C, E), computed once: not timed
        W, scale = head.weight, head.logit_scale.exp()

        def autocast(dt):
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16")

        def peer_images(encode, transform, dt):
            loader = torch.utils.data.DataLoader(Files(files, transform), batch_size=args.batch_size,
                                                 num_workers=args.workers)
            out = []
            for x in loader:
                with autocast(dt):
                    img = encode(x).float()
                probs = (scale * torch.nn.functional.normalize(img, dim=-1) @ W.T).softmax(-1)
                out.append(probs.topk(min(5, len(labels))))
            return out

        hf_transform = lambda im: hf_proc(images=im, return_tensors="pt").pixel_values[0]  # noqa: E731
        image_jobs = {
            "vitkit": lambda dt: classify_files(pair, files, labels, "imagenet", top_k=5, batch_size=args.batch_size,
                                                workers=args.workers, dtype=dt),
            "open_clip": lambda dt: peer_images(oc.encode_image, oc_pre, dt),
            "transformers": lambda dt: peer_images(lambda x: _features(hf.get_image_features(pixel_values=x)),
                                                   hf_transform, dt),
        }

        def hf_texts(dt):
            for s in range(0, len(texts), args.batch_size):
                t = hf_tok(texts[s:s + args.batch_size], padding=True, truncation=True, return_tensors="pt")
                with autocast(dt):
                    _features(hf.get_text_features(**t))

        def oc_texts(dt):
            for s in range(0, len(texts), args.batch_size):
                with autocast(dt):
                    oc.encode_text(oc_tok(texts[s:s + args.batch_size]))

        def vk_texts(dt):  # the Predictor's text path (its construction timed too, as a user's call)
            encode_texts(pair, texts, batch_size=args.batch_size, dtype=dt)

        text_jobs = {"vitkit": vk_texts, "open_clip": oc_texts, "transformers": hf_texts}

        # agreement (fp32): one batch preprocessed once, through the three models and the same head
        with torch.no_grad():
            x = torch.stack([Files(files[:8], oc_pre)[i] for i in range(min(8, len(files)))])
            probs = {name: (scale * torch.nn.functional.normalize(f(x).float(), dim=-1) @ W.T).softmax(-1)
                     for name, f in (("vitkit", pair.vision), ("open_clip", oc.encode_image),
                                     ("transformers", lambda x: _features(hf.get_image_features(pixel_values=x))))}
        agree = {p: float((probs["vitkit"] - probs[p]).abs().max()) for p in ("open_clip", "transformers")}

        def timed(fn, dt):
            t0 = time.perf_counter()
            with torch.no_grad():  # not inference_mode: vitkit.infer's engine reads weights' version counters
                fn(dt)
            return time.perf_counter() - t0

        res = {"model": "tiny CLIP (random)" if args.quick else "OpenCLIP ViT-B/16 (random weights)",
               "images": args.images, "texts": args.texts, "rounds": args.rounds, "batch_size": args.batch_size,
               "workers": args.workers, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": cpu.describe(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "open_clip": open_clip.__version__, "transformers": transformers.__version__,
               "fp32_max_abs_prob_diff_vs": agree, "results": {}}
        for what, jobs, n in (("images", image_jobs, args.images), ("texts", text_jobs, len(texts))):
            for dt in dtypes:
                names = list(jobs)
                for _ in range(args.warmup):
                    for name in names:
                        timed(jobs[name], dt)
                times = {name: [] for name in names}
                for r in range(args.rounds):
                    k = r % len(names)  # rotate the order: no library always runs first
                    for name in names[k:] + names[:k]:
                        times[name].append(timed(jobs[name], dt))
                row = {name: {"per_s": n / statistics.median(t)} for name, t in times.items()}
                for peer in ("open_clip", "transformers"):
                    row[f"ratio_vs_{peer}"] = statistics.median(p / v for p, v in zip(times[peer], times["vitkit"]))
                res["results"][f"{what}_{dt}"] = row
                if dt == "bf16":  # which runtime the timed rounds ran (the choosers the Predictors share)
                    tower = pair.vision if what == "images" else pair.text
                    said = [n for per in backends._CHOOSERS.get(tower, {}).values() for n in per.said]
                    res.setdefault("vitkit_bf16_backends", {})[what] = said
                    for n in said:
                        print(f"  vitkit {what} bf16: {n}", flush=True)
                print(f"{what:>6} {dt}: vitkit {row['vitkit']['per_s']:.1f}/s, open_clip {row['open_clip']['per_s']:.1f}/s "
                      f"(x{row['ratio_vs_open_clip']:.3f}), transformers {row['transformers']['per_s']:.1f}/s "
                      f"(x{row['ratio_vs_transformers']:.3f})", flush=True)
    print(f"fp32 zero-shot probabilities, max abs difference: vs open_clip {agree['open_clip']:.2e}, "
          f"vs transformers {agree['transformers']:.2e}")
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

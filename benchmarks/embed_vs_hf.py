"""`vitkit embed` throughput against Hugging Face `pipeline("image-feature-extraction")`.

Same random ViT-B/16 weights (an HF ViTModel with its pooler, saved with save_pretrained and
loaded by vitkit from that directory), same JPEG files (written by this script), same process,
same torch threads. Each round times both (order alternating), from file paths to pooled vectors:
HF with ``pool=True`` (the pooler output), vitkit with its default pooling (the same pooler, the
paper's pre-logits layer) and writing the parquet table as ``vitkit embed`` does. The ratio is the
median of the per-round paired ratios HF time / vitkit time (> 1: vitkit faster), with its IQR.

    python benchmarks/embed_vs_hf.py                       # ~3 min on 2 cores: 64 images, 4 rounds
    python benchmarks/embed_vs_hf.py --tiny --images 16 --rounds 2    # sanity run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Photos-like files of mixed sizes (smooth gradients + noise, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        h, w = int(rng.integers(240, 480)), int(rng.integers(320, 640))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], -1).astype(np.float32)
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        f = folder / f"img_{i:04d}.jpg"
        Image.fromarray(img).save(f, quality=90)
        files.append(str(f))
    return files


def hf_model_dir(tmp: Path, tiny: bool) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig() if not tiny else ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128)
    model = ViTModel(cfg, add_pooling_layer=True).eval()
    out = tmp / "hf_vit"
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="JPEG files embedded per round")
    ap.add_argument("--rounds", type=int, default=4, help="paired timed rounds (after one warm-up of each)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of both libraries")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decode workers of both libraries")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                    help="vitkit's --dtype (bf16 / int8 need vitkit.infer; HF always runs fp32)")
    ap.add_argument("--tiny", action="store_true", help="a 2-block, 64-wide ViT (sanity run)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    import transformers
    from transformers import pipeline

    import vitkit
    from vitkit.features import FeatureSpec, embed_files

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = write_jpegs(tmp / "images", args.images)
        mdir = hf_model_dir(tmp, args.tiny)
        pipe = pipeline("image-feature-extraction", model=str(mdir), device="cpu")
        model = vitkit.from_pretrained(mdir).eval()
        out = tmp / "emb.parquet"

        def run_hf():
            res = pipe(files, batch_size=args.batch_size, num_workers=args.workers, pool=True)
            return np.asarray([np.asarray(r).reshape(-1) for r in res], dtype=np.float32)

        def run_vitkit():
            embed_files(model, files, out, spec=FeatureSpec(dtype=args.dtype), source=str(mdir), batch_size=args.batch_size, workers=args.workers,
                        overwrite=True, progress=False)

        def timed(fn):
            t0 = time.perf_counter()
            r = fn()
            return time.perf_counter() - t0, r

        with torch.inference_mode():
            hf_vecs = run_hf()  # warm-up (and the vectors for the agreement check)
        run_vitkit()
        import pyarrow.parquet as pq

        vk_vecs = np.asarray(pq.read_table(out).column("embedding").to_pylist(), dtype=np.float32)
        diff = float(np.abs(hf_vecs - vk_vecs).max())
        cos = float(np.min(np.sum(hf_vecs * vk_vecs, 1) / (np.linalg.norm(hf_vecs, axis=1) *
                                                            np.linalg.norm(vk_vecs, axis=1))))
        t_hf, t_vk = [], []
        for r in range(args.rounds):
            order = [("hf", run_hf), ("vitkit", run_vitkit)]
            if r % 2:
                order.reverse()
            for name, fn in order:
                with torch.inference_mode():
                    sec, _ = timed(fn)
                (t_hf if name == "hf" else t_vk).append(sec)
            print(f"round {r + 1}/{args.rounds}: HF {args.images / t_hf[-1]:.1f} img/s, "
                  f"vitkit {args.images / t_vk[-1]:.1f} img/s, ratio {t_hf[-1] / t_vk[-1]:.3f}", flush=True)
        ratios = sorted(h / v for h, v in zip(t_hf, t_vk))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        res = {
            "model": "tiny ViT (random)" if args.tiny else "ViT-B/16 (random, HF ViTModel with pooler)",
            "vitkit_dtype": args.dtype, "images": args.images, "rounds": args.rounds, "batch_size": args.batch_size, "workers": args.workers,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "hf_img_per_s": args.images / statistics.median(t_hf),
            "vitkit_img_per_s": args.images / statistics.median(t_vk),
            "ratio_median": statistics.median(ratios), "ratio_iqr": [q[0], q[2]],
            "max_abs_diff_vs_hf": diff, "min_cosine_vs_hf": cos,
        }
    print(json.dumps(res, indent=2))
    print(f"embed throughput: vitkit {res['vitkit_img_per_s']:.1f} img/s vs HF pipeline {res['hf_img_per_s']:.1f} "
          f"img/s: ratio {res['ratio_median']:.3f} (IQR {res['ratio_iqr'][0]:.3f}-{res['ratio_iqr'][1]:.3f}); "
          f"vectors agree to {diff:.2e} (min cosine {cos:.6f})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`vitkit embed` throughput against Hugging Face `pipeline("image-feature-extraction")`.

Same random ViT-B/16 weights (an HF ViTModel with its pooler, saved with save_pretrained and
loaded by vitkit from that directory), same JPEG files (written by this script), same process,
same torch threads. Each round times both (order alternating), from file paths to pooled vectors:
HF with ``pool=True`` (the pooler output), vitkit with its default pooling (the same pooler, the
paper's pre-logits layer) and writing the parquet table as ``vitkit embed`` does. The ratio is the
median of the per-round paired ratios HF time / vitkit time (> 1: vitkit faster), with its IQR.

    python benchmarks/embed_vs_hf.py                       # ~3-4 min on 2 cores: 64 images, 4 rounds
    python benchmarks/embed_vs_hf.py --tiny --images 16 --rounds 2    # sanity run, under a minute

Two vitkit rows by default: ``fp32`` (exact: bit-equal to the model's forward_head(forward_features))
and ``bf16`` (vitkit.infer.Predictor; runs fp32 with a note on CPUs without native bf16).
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
    ap.add_argument("--dtypes", default="fp32,bf16",
                    help="vitkit --dtype values timed against the same HF runs (fp32 = exact; bf16 / int8 = "
                         "vitkit.infer's fast path); HF always runs fp32")
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

        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]

        def run_vitkit(dtype):
            embed_files(model, files, out, spec=FeatureSpec(dtype=dtype), source=str(mdir),
                        batch_size=args.batch_size, workers=args.workers, overwrite=True, progress=False)

        def timed(fn):
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            return time.perf_counter() - t0

        import pyarrow.parquet as pq

        with torch.inference_mode():
            hf_vecs = run_hf()  # warm-up (and the vectors for the agreement check)
        agree = {}
        for dt in dtypes:
            run_vitkit(dt)  # warm-up
            vk = np.asarray(pq.read_table(out).column("embedding").to_pylist(), dtype=np.float32)
            cos = np.sum(hf_vecs * vk, 1) / (np.linalg.norm(hf_vecs, axis=1) * np.linalg.norm(vk, axis=1))
            agree[dt] = {"max_abs_diff_vs_hf": float(np.abs(hf_vecs - vk).max()), "min_cosine_vs_hf": float(cos.min())}
        times: dict[str, list[float]] = {"hf": [], **{dt: [] for dt in dtypes}}
        jobs = [("hf", run_hf)] + [(dt, lambda dt=dt: run_vitkit(dt)) for dt in dtypes]
        for r in range(args.rounds):
            k = r % len(jobs)  # rotate the order: no library always runs first
            for name, fn in jobs[k:] + jobs[:k]:
                times[name].append(timed(fn))
            print(f"round {r + 1}/{args.rounds}: HF {args.images / times['hf'][-1]:.1f} img/s, " + ", ".join(
                f"vitkit {dt} {args.images / times[dt][-1]:.1f} img/s (x{times['hf'][-1] / times[dt][-1]:.3f})"
                for dt in dtypes), flush=True)
        res = {
            "model": "tiny ViT (random)" if args.tiny else "ViT-B/16 (random, HF ViTModel with pooler)",
            "images": args.images, "rounds": args.rounds, "batch_size": args.batch_size, "workers": args.workers,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "hf_img_per_s": args.images / statistics.median(times["hf"]), "vitkit": {},
        }
        for dt in dtypes:
            ratios = sorted(h / v for h, v in zip(times["hf"], times[dt]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            res["vitkit"][dt] = {"img_per_s": args.images / statistics.median(times[dt]),
                                 "ratio_median": statistics.median(ratios), "ratio_iqr": [q[0], q[2]], **agree[dt]}
    print(json.dumps(res, indent=2))
    for dt, v in res["vitkit"].items():
        print(f"embed throughput, vitkit {dt}: {v['img_per_s']:.1f} img/s vs HF pipeline {res['hf_img_per_s']:.1f} "
              f"img/s: ratio {v['ratio_median']:.3f} (IQR {v['ratio_iqr'][0]:.3f}-{v['ratio_iqr'][1]:.3f}); "
              f"vectors vs HF: max abs diff {v['max_abs_diff_vs_hf']:.2e}, min cosine {v['min_cosine_vs_hf']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

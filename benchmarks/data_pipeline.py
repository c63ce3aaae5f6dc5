"""Data-pipeline benchmark (issue 10 section 9): JPEG folder -> batches, and training from it.

Writes its own synthetic photo-sized JPEG folder (seeded), then in one run reports:

1. Loader throughput (images/s), for each --workers value: vitkit's ``make_loader`` vs torchvision
   ``ImageFolder`` + ``DataLoader`` vs timm ``create_loader``, all with RandomResizedCrop 224
   (scale 0.08-1) + horizontal flip + normalise, batch 64, persistent workers. Rounds alternate the
   three loaders; the ratio vs torchvision is the median of the per-round ratios (with its range).
2. Training throughput of a small ViT (ViT-S width, 4 blocks, patch 16 at 224) from the JPEG folder
   (vitkit loader, --train-workers, default vitkit's own default: cores - 1) vs the same model fed
   in-memory tensors of the same shape: the goal is >= 0.9x. On a CPU the loader's workers share
   the cores with the model, so the ratio says how much of the machine decoding takes. With
   ``--device cuda --amp bf16 --compile --model vit_base_patch16_224`` the same comparison on a GPU
   (the in-memory batch then sits on the GPU; batches from files are pinned and copied
   non-blocking). One untimed round of each side first: compile, worker start, page cache.

3. ``--vs-bare`` (issue 21, item 6) instead of 1 and 2: ``vitkit train`` itself, end to end (a fresh
   ``python -m vitkit train`` per round, its default augmentation for image files), on a model too
   small to matter (dim 32, 1 block, patch 32 at 224) against torchvision ``ImageFolder`` +
   ``DataLoader`` alone with the same workers and transforms (RandomResizedCrop at vitkit's scale
   0.35-1 + flip + normalise, batch 64, persistent workers), delivering batches to nobody. Rate of
   each side: the images of epochs 2..E over their seconds (vitkit: ``metrics.jsonl``, each epoch from
   its first ``iter()`` to its last step; the bare loader: the same span), so worker start-up, the
   evaluation between epochs and the process start are left out of both. Paired rounds, the side
   that goes first alternating; ratio = median of the per-round ratios (with its range).

Goals (issue 10): loader >= 1.0x torchvision at equal workers; file-data training >= 0.9x in memory.
Goal (issue 21): ``vitkit train`` >= 0.8x the bare loader end to end on 2 cores.

    PYTHONPATH=src python benchmarks/data_pipeline.py                 # ~3-4 min on 2 idle cores
    PYTHONPATH=src python benchmarks/data_pipeline.py --tiny          # sanity run, ~30 s
    benchmarks/run_gpu.sh data OUTDIR                                  # the GPU figure (BENCHMARKS.md)
    PYTHONPATH=src python benchmarks/data_pipeline.py --vs-bare --workers 2 --rounds 5   # ~4 min
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


def _photo(rng: np.random.RandomState, w: int, h: int) -> np.ndarray:
    """One photo-like image: smooth gradients + a dark blob + noise (uint8 HxWx3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * 80 + 120,
                     np.cos(yy / rng.uniform(20, 80) + rng.uniform(0, 6)) * 80 + 120,
                     (xx + yy) / (w + h) * 200 + rng.uniform(0, 40)], -1)
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 100)
    base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] *= 0.4
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _write_one(job) -> None:
    root, i, w, h, classes, seed = job
    from PIL import Image

    d = root / "train" / f"c{i % classes}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo(np.random.RandomState([seed, i]), w, h)).save(d / f"{i:05d}.jpg", quality=90)


def write_jpegs(root: Path, n: int, w: int, h: int, classes: int = 10, seed: int = 0, jobs: int = 1) -> Path:
    """Photo-like JPEGs (quality 90), ``classes`` folders. ``jobs`` > 1 writes them in that many
    processes, each image from its own seed (seed, i): other pixels than ``jobs=1``'s single
    stream, drawn from the same distribution (the CPU figures were measured with ``jobs=1``)."""
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            pool.map(_write_one, [(root, i, w, h, classes, seed) for i in range(n)], chunksize=16)
        return root
    from PIL import Image

    rng = np.random.RandomState(seed)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(rng, w, h)).save(d / f"{i:05d}.jpg", quality=90)
    return root


# --------------------------------------------------------------------------- the three loaders
def vitkit_loader(root: Path, workers: int, batch: int, size: int):
    from vitkit.data import AugmentSpec, DataSpec, build_data, make_loader

    data = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), image_size=size, val_fraction=0.01))
    aug = AugmentSpec(random_resized_crop=True, rrc_scale=(0.08, 1.0), hflip=True)
    return make_loader(data.train, batch_size=batch, train=True, seed=0, workers=workers, augment=aug,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def torchvision_loader(root: Path, workers: int, batch: int, size: int, scale=(0.08, 1.0)):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=scale), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def timm_loader(root: Path, workers: int, batch: int, size: int):
    from timm.data import create_dataset, create_loader

    ds = create_dataset("", root=str(root / "train"), is_training=True)
    return create_loader(ds, input_size=(3, size, size), batch_size=batch, is_training=True, scale=(0.08, 1.0),
                         hflip=0.5, color_jitter=0.0, re_prob=0.0, num_workers=workers, use_prefetcher=False,
                         persistent_workers=workers > 0, device=torch.device("cpu"))


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor()


def timed(loader, batches: int) -> float:
    """images/s over ``batches`` batches, after the first batch of a fresh epoch (pipeline full)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    dt = time.perf_counter() - t0
    del it
    return n / dt


def bench_loaders(root, workers_list, rounds, batches, batch, size):
    rows = []
    for w in workers_list:
        loaders = {"vitkit": vitkit_loader(root, w, batch, size), "torchvision": torchvision_loader(root, w, batch, size),
                   "timm": timm_loader(root, w, batch, size)}
        for ld in loaders.values():  # start persistent workers, warm caches
            timed(ld, 1)
        res = {k: [] for k in loaders}
        for r in range(rounds):
            order = list(loaders) if r % 2 == 0 else list(reversed(loaders))  # alternate who goes first
            for k in order:
                res[k].append(timed(loaders[k], batches))
        ratio = [a / b for a, b in zip(res["vitkit"], res["torchvision"])]
        ratio_timm = [a / b for a, b in zip(res["vitkit"], res["timm"])]
        row = {"workers": w, **{f"{k}_img_s": round(statistics.median(v), 1) for k, v in res.items()},
               "ratio_vs_torchvision": round(statistics.median(ratio), 3),
               "ratio_range": [round(min(ratio), 3), round(max(ratio), 3)],
               "ratio_vs_timm": round(statistics.median(ratio_timm), 3)}
        rows.append(row)
        print(f"workers {w}: vitkit {row['vitkit_img_s']:.0f} img/s  torchvision {row['torchvision_img_s']:.0f}  "
              f"timm {row['timm_img_s']:.0f}  |  vitkit/torchvision {row['ratio_vs_torchvision']:.3f} "
              f"(rounds {row['ratio_range'][0]:.3f}-{row['ratio_range'][1]:.3f})  vitkit/timm "
              f"{row['ratio_vs_timm']:.3f}", flush=True)
        del loaders
    return rows


# --------------------------------------------------------------------------- training: files vs memory
def bench_training(root, workers, rounds, steps, batch, size, dim, depth, device="cpu", amp="off", compile=False,
                   model_name=None):
    """Training images/s of one model from the JPEG folder (vitkit's loader: workers decode and
    augment, pinned batches copied non-blocking on CUDA) against the same model fed one batch of
    the same shape already on the device. Each step: forward (autocast with ``amp``), cross-entropy,
    backward, AdamW (vitkit's optimizer factory: fused). The clock reads after a device sync."""
    from types import SimpleNamespace

    from vitkit import ViT, ViTConfig, create_model
    from vitkit.data import AugmentSpec, DataSpec, build_data, make_loader
    from vitkit.train.optim import build_optimizer

    dev = torch.device(device)
    torch.manual_seed(0)
    if model_name:
        model = create_model(model_name, num_classes=10)
        label = f"{model_name} @ {size}"
    else:
        model = ViT(ViTConfig(image_size=size, patch_size=16, in_channels=3, num_classes=10, dim=dim, depth=depth,
                              num_heads=max(1, dim // 64), mlp_dim=dim * 4))
        label = f"ViT dim {dim} depth {depth} patch 16 @ {size}"
    model = model.to(dev).train()
    opt = build_optimizer(model, SimpleNamespace(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=1.0))
    net = torch.compile(model) if compile else model
    amp_dtype = {"off": None, "bf16": torch.bfloat16}[amp]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), image_size=size, val_fraction=0.01))
    aug = AugmentSpec(random_resized_crop=True, rrc_scale=(0.08, 1.0), hflip=True)
    loader = make_loader(data.train, batch_size=batch, train=True, seed=0, workers=workers, augment=aug,
                         device_type=dev.type)
    mem_x = torch.randn(batch, 3, size, size, device=dev)
    mem_y = torch.randint(0, 10, (batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(x, y):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    epoch = [0]

    def from_files():
        epoch[0] += 1
        loader.set_epoch(epoch[0])
        it = iter(loader)
        step(*next(it))  # pipeline full
        sync()
        n, t0 = 0, time.perf_counter()
        for _ in range(steps):
            x, y = next(it)
            step(x, y)
            n += len(x)
        sync()
        return n / (time.perf_counter() - t0)

    def from_memory():
        step(mem_x, mem_y)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(mem_x, mem_y)
        sync()
        return steps * batch / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    from_memory()  # warm up (and compile)
    warm = time.perf_counter() - t0
    from_files()  # start the workers, read the files once (page cache): both sides run warm
    files, mem = [], []
    for r in range(rounds):
        if r % 2:
            mem.append(from_memory())
            files.append(from_files())
        else:
            files.append(from_files())
            mem.append(from_memory())
    ratio = [a / b for a, b in zip(files, mem)]
    row = {"workers": workers, "model": label, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else "cpu", "amp": amp, "compile": compile, "batch_size": batch, "steps_per_round": steps,
           "warmup_seconds": round(warm, 1),
           "files_img_s": round(statistics.median(files), 1), "memory_img_s": round(statistics.median(mem), 1),
           "ratio_files_vs_memory": round(statistics.median(ratio), 3),
           "ratio_range": [round(min(ratio), 3), round(max(ratio), 3)]}
    print(f"training ({row['model']}, {row['device']}, amp {amp}{', compiled' if compile else ''}, batch {batch}, "
          f"{workers} workers): JPEG folder {row['files_img_s']:.0f} img/s, in memory {row['memory_img_s']:.0f} "
          f"img/s  |  files/memory {row['ratio_files_vs_memory']:.3f} "
          f"(rounds {row['ratio_range'][0]:.3f}-{row['ratio_range'][1]:.3f})", flush=True)
    return row


# --------------------------------------------------------------------------- vitkit train vs the bare loader
def bare_rate(root: Path, workers: int, batch: int, size: int, epochs: int) -> float:
    """torchvision ImageFolder + DataLoader alone: images/s over epochs 2..``epochs``, each timed from
    its ``iter()`` to its last batch (what vitkit's ``metrics.jsonl`` times of a training epoch)."""
    loader = torchvision_loader(root, workers, batch, size, scale=(0.35, 1.0))
    n, seconds = 0, 0.0
    for e in range(epochs):
        t0 = time.perf_counter()
        k = sum(len(x) for x, _ in loader)
        if e:
            n, seconds = n + k, seconds + time.perf_counter() - t0
    del loader
    return n / seconds


def vitkit_train_rate(root: Path, out: Path, workers: int, batch: int, size: int, epochs: int,
                      extra: list[str]) -> tuple[float, float]:
    """``python -m vitkit train`` on the folder, a fresh process: (images/s of epochs 2..``epochs`` from
    its metrics.jsonl, the whole command's wall seconds)."""
    import subprocess

    cmd = [sys.executable, "-m", "vitkit", "train", "--dataset", "imagefolder", "--data-dir", str(root),
           "--image-size", str(size), "--patch-size", "32", "--dim", "32", "--depth", "1", "--num-heads", "1",
           "--batch-size", str(batch), "--workers", str(workers), "--epochs", str(epochs), "--warmup-epochs", "1",
           "--out", str(out), "--overwrite", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    n = sum(r["images_per_second"] * r["epoch_seconds"] for r in recs)
    return n / sum(r["epoch_seconds"] for r in recs), wall


def bench_vs_bare(root: Path, workers: int, rounds: int, batch: int, size: int, epochs: int, extra: list[str]):
    runs = tempfile.TemporaryDirectory()  # beside the data, never inside it (vitkit refuses that)
    res: dict[str, list[float]] = {"vitkit": [], "bare": [], "wall": []}
    for r in range(rounds):
        for side in (("vitkit", "bare") if r % 2 == 0 else ("bare", "vitkit")):
            if side == "bare":
                res["bare"].append(bare_rate(root, workers, batch, size, epochs))
            else:
                rate, wall = vitkit_train_rate(root, Path(runs.name) / "run", workers, batch, size, epochs, extra)
                res["vitkit"].append(rate)
                res["wall"].append(wall)
        print(f"round {r + 1}: vitkit train {res['vitkit'][-1]:.0f} img/s (command {res['wall'][-1]:.1f} s), "
              f"bare loader {res['bare'][-1]:.0f} img/s", flush=True)
    runs.cleanup()
    ratio = [a / b for a, b in zip(res["vitkit"], res["bare"])]
    row = {"workers": workers, "batch_size": batch, "crop": size, "epochs": epochs, "timed_epochs": epochs - 1,
           "train_args": extra, "model": "ViT dim 32, depth 1, patch 32 @ 224",
           "vitkit_train_img_s": round(statistics.median(res["vitkit"]), 1),
           "bare_loader_img_s": round(statistics.median(res["bare"]), 1),
           "command_seconds": round(statistics.median(res["wall"]), 1),
           "ratio_vs_bare": round(statistics.median(ratio), 3),
           "ratio_range": [round(min(ratio), 3), round(max(ratio), 3)], "rounds": {k: [round(v, 1) for v in vs]
                                                                                  for k, vs in res.items()}}
    print(f"vitkit train {row['vitkit_train_img_s']:.0f} img/s vs bare ImageFolder + DataLoader "
          f"{row['bare_loader_img_s']:.0f} img/s ({workers} workers): {row['ratio_vs_bare']:.3f}x "
          f"(rounds {row['ratio_range'][0]:.3f}-{row['ratio_range'][1]:.3f})", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="JPEGs to write")
    p.add_argument("--image-wh", default="400x300", help="their width x height")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to compare")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement")
    p.add_argument("--batches", type=int, default=6, help="timed batches per loader round")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--train-steps", type=int, default=6, help="timed steps per training round")
    p.add_argument("--dim", type=int, default=384, help="training model width (depth --depth, patch 16)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--train-workers", type=int, default=None,
                   help="loader workers for the training comparison (default: vitkit's default_workers())")
    p.add_argument("--device", default="cpu", help="training device for the files-vs-memory comparison (cpu, cuda)")
    p.add_argument("--amp", choices=["off", "bf16"], default="off", help="autocast dtype of the training step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model of the training comparison")
    p.add_argument("--model", default=None,
                   help="a preset (e.g. vit_base_patch16_224) instead of the small --dim/--depth model")
    p.add_argument("--skip-loaders", action="store_true", help="only the training comparison")
    p.add_argument("--jpeg-jobs", type=int, default=1,
                   help="processes writing the JPEGs (>1: each image from its own seed; see write_jpegs)")
    p.add_argument("--vs-bare", action="store_true",
                   help="only `vitkit train` end to end vs the bare torchvision loader (the first --workers value)")
    p.add_argument("--epochs", type=int, default=4, help="--vs-bare: epochs per run (the first is not timed)")
    p.add_argument("--train-args", default="", help="--vs-bare: extra `vitkit train` flags, e.g. '--threads 1'")
    p.add_argument("--tiny", action="store_true", help="sanity run: few small images, one round")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.image_wh, args.rounds, args.batches, args.batch_size = 80, "160x120", 1, 2, 16
        args.size, args.train_steps, args.dim, args.depth, args.workers = 64, 2, 64, 1, "0,1"
    w, h = (int(v) for v in args.image_wh.lower().split("x"))
    workers = [int(v) for v in args.workers.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp), args.images, w, h, jobs=args.jpeg_jobs)
        print(f"wrote {args.images} JPEGs of {w}x{h} in {time.time() - t0:.1f} s; torch threads "
              f"{torch.get_num_threads()}", flush=True)
        if args.vs_bare:  # a small val/ split: vitkit trains on all of train/, as the bare loader reads it
            import shutil

            for f in sorted((root / "train").rglob("*.jpg"))[:20]:
                (root / "val" / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, root / "val" / f.parent.name / f.name)
            row = bench_vs_bare(root, workers[0], args.rounds, args.batch_size, args.size, args.epochs,
                                args.train_args.split())
            out = {"images": args.images, "image_wh": [w, h], "vs_bare": row, "cpu": cpu_name(),
                   "seconds": round(time.time() - t0, 1)}
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            return 0
        loaders = [] if args.skip_loaders else bench_loaders(root, workers, args.rounds, args.batches,
                                                             args.batch_size, args.size)
        from vitkit.data import default_workers

        tw = default_workers() if args.train_workers is None else args.train_workers
        training = bench_training(root, tw, args.rounds, args.train_steps, args.batch_size, args.size,
                                  args.dim, args.depth, device=args.device, amp=args.amp, compile=args.compile,
                                  model_name=args.model)
    out = {"images": args.images, "image_wh": [w, h], "batch_size": args.batch_size, "crop": args.size,
           "loaders": loaders, "training": training, "seconds": round(time.time() - t0, 1)}
    print(f"total {out['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

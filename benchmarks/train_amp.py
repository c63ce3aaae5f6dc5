"""What `vitkit train --amp auto` picks on this CPU, what it costs, and whether the pick is right.

For each model below: the choice and its log line (vitkit.train.amp.choose_amp, timed: the cost a run
pays before its first step), then a longer paired measurement of the same forward + backward step
(fp32 vs bf16 autocast, no optimizer, ROUNDS rounds, alternating order) as the reference the quick
measurement should agree with. Prints one JSON line per model.

    .venv/bin/python benchmarks/train_amp.py [--threads 1] [--rounds 7]

On a shared machine the ratios are indicative only; rerun it idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vitkit import ViT, ViTConfig, cpu
from vitkit.train import amp

# (name, ViTConfig kwargs, micro-batch): the default digits run, small widths around the crossover,
# ViT-S/16 at 224 px
MODELS = [
    ("digits default", dict(image_size=16, patch_size=4, dim=32, depth=4, num_heads=4, mlp_ratio=2.0), 64),
    ("dim 64, 64 tokens", dict(image_size=32, patch_size=4, dim=64, depth=4, num_heads=4), 64),
    ("dim 128, 64 tokens", dict(image_size=32, patch_size=4, dim=128, depth=4, num_heads=4), 64),
    ("dim 192, 64 tokens", dict(image_size=64, patch_size=8, dim=192, depth=6, num_heads=3), 32),
    ("ViT-S/16 224px", dict(image_size=224, patch_size=16, dim=384, depth=12, num_heads=6), 8),
]


def reference_ratio(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> tuple[float, float]:
    """(median fp32 / bf16 step-time ratio, median fp32 step seconds) over ``rounds`` paired rounds."""
    for bf16 in (False, True):
        amp._step(model, x, bf16)
    ratios, fp32 = [], []
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        t = {bf16: amp._step(model, x, bf16) for bf16 in order}
        ratios.append(t[False] / t[True])
        fp32.append(t[False])
    return statistics.median(ratios), statistics.median(fp32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": cpu.describe(), "torch": torch.__version__, "threads": args.threads,
                      "date": time.strftime("%Y-%m-%d %H:%M %Z")}))
    for name, kw, batch in MODELS:
        model = ViT(ViTConfig(num_classes=10, **kw))
        t0 = time.perf_counter()
        choice = amp.choose_amp("auto", model, torch.device("cpu"), batch)
        cost = time.perf_counter() - t0
        x = torch.randn(batch, 3, kw["image_size"], kw["image_size"])
        ratio, fp32_s = reference_ratio(model.train(), x, args.rounds)
        print(json.dumps({"model": name, "batch": batch, "auto": choice.amp, "log": choice.note,
                          "choice_seconds": round(cost, 2), "reference_bf16_speedup": round(ratio, 3),
                          "fp32_step_s": round(fp32_s, 4)}), flush=True)


if __name__ == "__main__":
    main()

"""Where a GPU step's time goes: torch.profiler over a few steps of ViT-B/16 bf16 (vitkit), the
kernels by CUDA time. Modes: train (autocast, fused AdamW) and infer (Predictor bf16), eager or
compiled.

    PYTHONPATH=src python benchmarks/gpu_profile.py --mode train [--compile] [--batch-size 256]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    from vitkit import create_model
    from vitkit.bench.throughput import bench_optimizer, make_step
    from vitkit.infer import Predictor

    d = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(args.model).to(d)
    x = torch.randn(args.batch_size, 3, *model.config.image_hw, device=d)
    y = torch.randint(0, model.config.num_classes, (args.batch_size,), device=d)
    if args.mode == "train":
        opt = bench_optimizer("vitkit", model)
        step = make_step(torch.compile(model) if args.compile else model, x, y, True, "bf16", d, opt=opt)
    else:
        pred = Predictor(model.eval(), "bf16", compile=args.compile)

        def step():
            pred(x)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"# {args.model} {args.mode} bf16 batch {args.batch_size} {'compiled' if args.compile else 'eager'}, 3 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()

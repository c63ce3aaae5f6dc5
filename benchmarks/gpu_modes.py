"""torch.compile modes for bf16 inference on a GPU (ViT-B/16 by default): which one the Predictor
should offer. Times the bf16 copy of the model (what ``Predictor(model, "bf16")`` runs) eager and
under each mode with ``triton.testing.do_bench`` (median, CUDA events), reports img/s and MFU
against the datasheet peak and against this card's measured 8192^3 bf16 matmul rate.

    PYTHONPATH=src python benchmarks/gpu_modes.py [--batch-size 256] [--modes default max-autotune-no-cudagraphs]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, nargs="+", default=[256])
    p.add_argument("--modes", nargs="+", default=["eager", "default", "max-autotune-no-cudagraphs"])
    args = p.parse_args()
    import triton.testing as tt

    from vitkit import create_model
    from vitkit.bench.flops import count_flops
    from vitkit.bench.throughput import peak_flops

    d = torch.device("cuda")
    a = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
    measured = 2 * 8192**3 / tt.do_bench(lambda: a @ a, warmup=200, rep=1000, return_mode="median") * 1e3
    peak = peak_flops(d, "bf16")
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    net = copy.deepcopy(model).to(d, torch.bfloat16)
    flops = count_flops(model.config)["flops"]
    print(f"# {args.model} bf16 weights, {torch.cuda.get_device_name(d)}, torch {torch.__version__}; "
          f"peak {peak / 1e12:.0f} (datasheet), measured 8192^3 matmul {measured / 1e12:.0f} TFLOP/s")
    for mode in args.modes:
        torch._dynamo.reset()
        fn = net if mode == "eager" else torch.compile(net, mode=mode)
        for bs in args.batch_size:
            x = torch.randn(bs, 3, *model.config.image_hw, device=d, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn(x)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0

                def call(fn=fn, x=x):
                    fn(x)
                ms = tt.do_bench(call, warmup=100, rep=1000, return_mode="median")
            ach = flops * bs / ms * 1e3
            print(f"{mode:<28} batch {bs:>4}: {ms:7.2f} ms  {bs / ms * 1e3:8.0f} img/s  {ach / 1e12:6.1f} TFLOP/s  "
                  f"MFU {100 * ach / peak:5.1f}% of datasheet, {100 * ach / measured:5.1f}% of measured  "
                  f"(first call {first:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

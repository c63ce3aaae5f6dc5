#!/usr/bin/env bash
# GPU figures on a lent GPU machine (BENCHMARKS.md "GPU"): the device's own ceilings, ViT-B/16 bf16
# inference and training against timm (eager and compiled, with MFU), and training from a JPEG folder
# against in-memory tensors. Run from the repository root with vitkit importable (PYTHONPATH=src):
#   benchmarks/run_gpu.sh PART [OUTDIR]   PART: ceilings | attention | infer | train | train-compiled | data | all
set -u
part=${1:-all}
out=${2:-.}
py=${PYTHON:-python3}
model=${MODEL:-vit_base_patch16_224}
bs=${BATCH:-256}
run() { echo "+ $*"; "$@" 2>&1 | grep -v "^timing" | tee -a "$out/gpu_$part.txt"; }

if [[ $part == ceilings || $part == all ]]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv | tee -a "$out/gpu_$part.txt"
  run $py - <<'PY'
import torch, triton.testing as tt
d = torch.device("cuda")
print("torch", torch.__version__, torch.cuda.get_device_name(d))
for n in (8192, 4096):
    a, b = torch.randn(n, n, device=d, dtype=torch.bfloat16), torch.randn(n, n, device=d, dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median")
    print(f"bf16 matmul {n}^3 (random data): {2 * n**3 / ms / 1e9:.0f} TFLOP/s")
# the shapes of ViT-B/16 at batch 256 (M = 256 * 197 tokens)
M = 256 * 197
for k, n in ((768, 2304), (768, 3072), (3072, 768), (768, 768)):
    x = torch.randn(M, k, device=d, dtype=torch.bfloat16); w = torch.randn(n, k, device=d, dtype=torch.bfloat16)
    bias = torch.randn(n, device=d, dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: torch.nn.functional.linear(x, w, bias), warmup=100, rep=500, return_mode="median")
    print(f"bf16 linear {M}x{k} @ {k}x{n}: {2 * M * k * n / ms / 1e9:.0f} TFLOP/s")
x = torch.randn(256 * 1024 * 1024, device=d)
ms = tt.do_bench(lambda: x.clone(), warmup=50, rep=300, return_mode="median")
print(f"device copy: {2 * x.numel() * 4 / ms / 1e9:.2f} TB/s (read + write)")
PY
fi
if [[ $part == attention || $part == all ]]; then  # which SDPA kernel: ViT-B/16's shape, batch $bs
  run $py - "$bs" <<'PY'
import sys, torch, triton.testing as tt
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
d, B = torch.device("cuda"), int(sys.argv[1])
q, k, v = (torch.randn(B, 12, 197, 64, device=d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
fl = 4 * B * 12 * 197 * 197 * 64
for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    try:
        with sdpa_kernel(be):
            f = tt.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300, return_mode="median")
            fb = tt.do_bench(lambda: F.scaled_dot_product_attention(q, k, v).backward(g), warmup=50, rep=300,
                             return_mode="median")
        print(f"{be.name:<22} forward {f * 1e3:6.0f} us ({fl / f / 1e9:4.0f} TFLOP/s)  forward+backward "
              f"{fb * 1e3:6.0f} us ({3.5 * fl / fb / 1e9:4.0f} TFLOP/s)")
    except RuntimeError as e:
        print(f"{be.name}: not available ({str(e).splitlines()[0]})")
PY
fi
b=(-m vitkit bench "$model" --device cuda --dtype bf16 --batch-size "$bs")
if [[ $part == infer || $part == all ]]; then
  run $py "${b[@]}" --warmup 10 --runs 40
  run $py "${b[@]}" --warmup 10 --runs 40 --compile
fi
if [[ $part == train || $part == all ]]; then
  run $py "${b[@]}" --warmup 5 --runs 20 --train
fi
if [[ $part == train-compiled || $part == all ]]; then
  run $py "${b[@]}" --warmup 5 --runs 20 --train --compile
fi
if [[ $part == data || $part == all ]]; then
  w=$(( $(nproc) - 1 ))
  run $py benchmarks/data_pipeline.py --skip-loaders --device cuda --amp bf16 --compile --model "$model" \
      --images 6000 --image-wh 500x375 --batch-size "$bs" --train-workers "$w" --train-steps 15 --rounds 3 \
      --jpeg-jobs "$(nproc)" --json "$out/gpu_data.json"
fi

#!/usr/bin/env bash
# Reproduces the CPU figures in BENCHMARKS.md: vitkit vs timm, same weights, interleaved rounds.
# Usage: benchmarks/run_cpu.sh [VITKIT_CMD]   (default: .venv/bin/vitkit)
set -euo pipefail
VITKIT=${1:-.venv/bin/vitkit}
for model in vit_small_patch16_224 vit_base_patch16_224; do
  "$VITKIT" bench "$model" --batch-size 8 32 --runs 10 --warmup 3
  "$VITKIT" bench "$model" --batch-size 8 32 --runs 6 --warmup 2 --train
done

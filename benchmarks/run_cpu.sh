#!/usr/bin/env bash
# Reproduces the CPU figures in BENCHMARKS.md: vitkit vs timm, same weights, interleaved rounds,
# ratio = median of per-round paired ratios (with its IQR: the VM's noise). Rounds are many where
# steps are short: single rounds on this VM move +-10-20%.
# Training steps use each library's own AdamW factory (add --same-optimizer to compare the models alone).
# The inference lines time the model's forward only (--predictor without dtypes); the Predictor rows are in run_predictor.sh.
# Usage: benchmarks/run_cpu.sh [VITKIT_CMD]   (default: .venv/bin/vitkit); about 30 minutes on 2 cores; add 2>/dev/null to drop the progress bars from a saved log.
set -euo pipefail
VITKIT=${1:-.venv/bin/vitkit}
"$VITKIT" bench vit_small_patch16_224 --batch-size 8 --runs 60 --warmup 3 --predictor
"$VITKIT" bench vit_small_patch16_224 --batch-size 32 --runs 20 --warmup 2 --predictor
"$VITKIT" bench vit_small_patch16_224 --batch-size 8 --runs 30 --warmup 2 --train
"$VITKIT" bench vit_small_patch16_224 --batch-size 32 --runs 10 --warmup 2 --train
"$VITKIT" bench vit_base_patch16_224 --batch-size 8 --runs 30 --warmup 2 --predictor
"$VITKIT" bench vit_base_patch16_224 --batch-size 32 --runs 12 --warmup 2 --predictor
"$VITKIT" bench vit_base_patch16_224 --batch-size 8 --runs 12 --warmup 2 --train
"$VITKIT" bench vit_base_patch16_224 --batch-size 32 --runs 12 --warmup 1 --train

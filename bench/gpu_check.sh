#!/usr/bin/env bash
# The one-GPU check of the PG loop (bench/gpu_check.py says what it runs): 3 GRPO steps with the KL
# term, HF rollouts, a SmolLM2-135M-shaped random model, as one NCCL process, under ZeRO-2 and
# under ZeRO-3; per run: finished, collective backend, median step time, peak GPU memory. At most
# about 8 minutes on one H100. Last line: gpu_check=<runs passed>/3.
#   SHAPE=DIR bash bench/gpu_check.sh             # DIR: config.json + tokenizer files of SmolLM2
#   PY=python3 SHAPE=DIR bash bench/gpu_check.sh  # with a system Python that has torch+CUDA
# DIR is made here from the converted model (3.5 MB): copy config.json, tokenizer.json,
# tokenizer_config.json and chat_template.jinja of ~/.cache/rlx/models/SmolLM2-135M-Instruct
# (`rlx env` prints the folder). The lent GPU machine has torch, accelerate, transformers and peft
# but no DeepSpeed or datasets: carry their wheels and the ones they need that are missing there
# (see the device notes; DeepSpeed's sdist builds a pure-Python wheel here with `pip wheel
# --no-deps deepspeed==0.19.8`). Without DeepSpeed only the plain run can pass.
# The vLLM paths on a GPU (the colocated engine with rollout.sleep, NCCL weight sync to `rlx serve`)
# need a machine with vLLM and are not covered here.
# Not yet run on a GPU: no GPU was lent when it was written (docs/hardware.md keeps the record).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHAPE=${SHAPE:?set SHAPE to a folder with config.json and tokenizer files}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 480 "$PY" bench/gpu_check.py --shape "$SHAPE" --out "${OUT:-/tmp}/rlx_gpu_check" "$@"

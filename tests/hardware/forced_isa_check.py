"""Run in a subprocess by test_forced_isa.py, with RLX_CPU_ISA set: what this vLLM build does.

    python tests/hardware/forced_isa_check.py MODEL INT4_EXPORT

Prints one JSON line: the `rlx env` report, the engine dtype `auto` picked, the largest logprob gap
of the engine against an HF float32 forward, and how the int4 export was served and its gap.
Where the build has no int4 kernel it also checks that asking for vLLM's int4 explicitly fails with
one clear error, and that an engine that failed on the int4 export leaves the next engine working
(the failure is kept alive across the next engine's start, as a test runner's traceback would).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import sys

import torch
from transformers import AutoModelForCausalLM

import rlx  # noqa: F401  (applies RLX_CPU_ISA before vLLM loads its kernels)
from rlx import cli
from rlx.hardware import HardwareError, report
from rlx.quant.serve import dequantize_export, serving_engine, serving_plan
from rlx.rollout import Sampling
from rlx.rollout.vllm_backend import VLLMEngine

TOKENS = [1, 57, 210, 33, 99, 140, 260, 301, 12, 88, 402, 7, 150, 3, 45, 2]


def hf_logprobs(path: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS[1:])[:, None])[:, 0]


def gap(engine, reference: torch.Tensor) -> float:
    served = torch.tensor(engine.prompt_logprobs([TOKENS])[0])
    return float((served - reference).abs().max())


def main(model: str, export: str, workdir: str) -> dict:
    out = {"report": report()}
    engine = VLLMEngine(model, max_model_len=256)
    try:
        out["engine_dtype"] = engine.dtype
        out["engine_gap"] = gap(engine, hf_logprobs(model))
        sample = engine.generate(["Sam has"], Sampling(n=2, max_new_tokens=6))
        out["sampled_logprobs"] = [len(c.logprobs) == len(c.token_ids) for c in sample]
    finally:
        engine.close()

    exact = hf_logprobs(str(dequantize_export(export, f"{workdir}/dequantized")))
    with serving_engine(export, say=lambda line: out.setdefault("int4_note", line)) as (eng, how):
        out["int4_served"] = how
        out["int4_gap"] = gap(eng, exact)

    if not out["report"]["int4_serving"]:
        try:
            serving_plan(export, int4="vllm")
        except HardwareError as err:
            out["int4_vllm_error"] = str(err)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            args = ["eval", "--model", export, "--num-prompts", "2", "int4=vllm"]
            out["eval_int4_vllm_exit"] = cli.main(args)
        out["eval_int4_vllm_stderr"] = stderr.getvalue()
        failure = None
        broken = VLLMEngine(export, dtype="bfloat16", max_model_len=256)  # starts, fails to run
        try:
            broken.prompt_logprobs([TOKENS])
        except Exception as err:  # noqa: BLE001  (kept alive on purpose, see the docstring)
            failure = err
            out["int4_engine_failure"] = f"{type(err).__name__}: {err}"[:300]
        finally:
            broken.close()
        engine = VLLMEngine(model, dtype="float32", max_model_len=256)
        try:
            out["int4_engine_failed"] = failure is not None
            del failure
            gc.collect()  # the failed engine's leftovers are collected while this one runs
            out["after_failure_gap"] = gap(engine, hf_logprobs(model))
            sample = engine.generate(["Sam has"], Sampling(n=2, max_new_tokens=6))
            out["after_failure_sampled"] = [len(c.logprobs) == len(c.token_ids) for c in sample]
        finally:
            engine.close()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:4])))

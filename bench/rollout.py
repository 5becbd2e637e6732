"""Rollout throughput: the rlx vLLM backend vs vLLM used directly vs the HF `generate` fallback.

What it measures: generated tokens per second of wall time for the same chat prompts (the
arithmetic task's test split) sampled the same way (temperature 1.0, `n` completions per prompt, at
most `max_new_tokens` new tokens, no stop strings) through
  (a) rlx   `VLLMEngine.generate` (chat template, request building, Completion objects, logprobs),
  (b) vLLM  `engine.llm.generate` called directly on the same pre-tokenized prompt ids with
            equivalent `SamplingParams` (incl. `logprobs=0`, so the sampler does the same work),
  (c) HF    `HFEngine.generate` (optional, often on fewer prompts: it is ~10x slower; tokens/s is
            a rate, so it stays comparable).

How: (a) and (b) run on the SAME `LLM` object, the one `VLLMEngine` builds (in-process, "uni"
executor, the given dtype, enforce_eager, its KV cache size and seed). Only one vLLM engine lives
sensibly in a process, and sharing it is the fairest comparison: same weights, same KV cache, same
kernels, so the ratio isolates rlx's overhead around `llm.generate`. Repeats are interleaved
(rlx, direct, rlx, direct, ...) to cancel drift from other load on the machine. Each backend is
warmed up once with a small generate. Neither HF nor vLLM can be forced to a fixed length here (HF
has no ignore_eos in HFEngine), so each run counts the tokens it actually generated, and the
reported rate is the median over repeats of tokens / seconds.

Command (from the repository root):
    .venv/bin/python bench/rollout.py                 # SmolLM2-135M, a few minutes on 2 cores
    .venv/bin/python bench/rollout.py --model tiny    # tiny random model, seconds

Goal: rlx adds no meaningful overhead, `rollout_ratio` (rlx tok/s / direct vLLM tok/s) >= 0.95.
The last line printed is exactly `rollout_ratio=<ratio with 3 decimals>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Result:
    """Timed repeats of one backend."""

    backend: str
    sequences: int
    tokens: list[int]  # generated tokens per repeat
    seconds: list[float]  # wall seconds per repeat

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds, strict=True))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help='alias, folder or "tiny" (random, built now)')
    p.add_argument("--prompts", type=int, default=32, help="prompts for the vLLM backends")
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument(
        "--dtype", default="auto", help="vLLM dtype (auto: bf16 where native, else fp32)"
    )
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-hf", action="store_true", help="do not run the HF generate fallback")
    p.add_argument("--hf-prompts", type=int, default=8, help="prompts for HF (it is ~10x slower)")
    return p.parse_args()


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """Run fn (which returns its generated-token count) and return (tokens, wall seconds)."""
    start = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start


def bench_vllm(model: str, prompts: list, args: argparse.Namespace) -> tuple[Result, Result]:
    """Time rlx `VLLMEngine.generate` against `llm.generate` on the same engine, interleaved."""
    from vllm import SamplingParams

    from rlx.rollout.base import Sampling, encode_prompts
    from rlx.rollout.vllm_backend import VLLMEngine

    engine = VLLMEngine(model, dtype=args.dtype, seed=0)
    args.dtype = engine.dtype  # what auto resolved to, for the report
    sampling = Sampling(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    # The direct path gets pre-tokenized prompts: what a hand-written vLLM rollout would pass.
    requests = [{"prompt_token_ids": ids} for ids in encode_prompts(engine.tokenizer, prompts)]
    params = SamplingParams(n=args.n, max_tokens=args.max_new_tokens, temperature=1.0, logprobs=0)

    def run_rlx(batch=prompts, s=sampling) -> int:
        return sum(len(c.token_ids) for c in engine.generate(batch, s))

    def run_direct(batch=requests, sp=params) -> int:
        outputs = engine.llm.generate(batch, sp, use_tqdm=False)
        return sum(len(o.token_ids) for out in outputs for o in out.outputs)

    # Warm-up: a small generate through each path.
    run_rlx(prompts[:2], Sampling(n=2, max_new_tokens=8, temperature=1.0))
    run_direct(requests[:2], SamplingParams(n=2, max_tokens=8, temperature=1.0, logprobs=0))

    sequences = len(prompts) * args.n
    rlx = Result("rlx vLLM (VLLMEngine.generate)", sequences, [], [])
    direct = Result("vLLM direct (llm.generate)", sequences, [], [])
    for _ in range(args.repeats):
        for result, fn in ((rlx, run_rlx), (direct, run_direct)):
            tokens, seconds = timed(fn)
            result.tokens.append(tokens)
            result.seconds.append(seconds)
    engine.close()  # frees the LLM (del + gc.collect) before HF loads its own copy
    return rlx, direct


def bench_hf(model: str, prompts: list, args: argparse.Namespace) -> Result:
    """Time the HF `generate` fallback on (possibly fewer) prompts."""
    from rlx.rollout.base import Sampling
    from rlx.rollout.hf_backend import HFEngine

    engine = HFEngine(model, dtype=args.hf_dtype, seed=0)
    sampling = Sampling(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    engine.generate(prompts[:2], Sampling(n=2, max_new_tokens=8, temperature=1.0))  # warm-up
    result = Result(f"HF generate ({args.hf_dtype})", len(prompts) * args.n, [], [])
    for _ in range(args.repeats):
        tokens, seconds = timed(
            lambda: sum(len(c.token_ids) for c in engine.generate(prompts, sampling))
        )
        result.tokens.append(tokens)
        result.seconds.append(seconds)
    engine.close()
    return result


def print_table(results: list[Result]) -> None:
    header = (
        f"{'backend':<34} {'sequences':>9} {'gen tokens':>10} {'median s':>9} {'tok/s':>8}"
        "  tok/s of each repeat"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        rates = " ".join(f"{t / s:.0f}" for t, s in zip(r.tokens, r.seconds, strict=True))
        print(
            f"{r.backend:<34} {r.sequences:>9} {int(statistics.median(r.tokens)):>10} "
            f"{statistics.median(r.seconds):>9.2f} {r.tokens_per_s:>8.1f}  {rates}"
        )


def main() -> None:
    args = parse_args()
    # Must be set before vllm is imported (VLLMEngine sets it too).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from rlx.tasks import load_task_dataset

    with tempfile.TemporaryDirectory(prefix="rlx-bench-") as tmp:
        model = args.model
        if model == "tiny":
            from rlx.models.tiny import build_tiny_model

            model = str(build_tiny_model(tmp))
        dataset = load_task_dataset("arithmetic", split="test", num_examples=args.prompts)
        prompts = list(dataset["prompt"])

        rlx, direct = bench_vllm(model, prompts, args)
        results = [rlx, direct]
        if not args.skip_hf:
            results.append(bench_hf(model, prompts[: args.hf_prompts], args))

    print()
    print(
        f"model={args.model} vllm_dtype={args.dtype} n={args.n} "
        f"max_new_tokens={args.max_new_tokens} temperature=1.0 repeats={args.repeats} (median)"
    )
    print_table(results)
    if not args.skip_hf and args.hf_prompts != args.prompts:
        print(
            f"note: HF ran on {min(args.hf_prompts, len(prompts))} prompts (vLLM on "
            f"{len(prompts)}); tokens/s is a rate, so the rows stay comparable."
        )
    print("note: rlx and direct share one LLM object; repeats interleaved rlx, direct, ...")
    print(f"rollout_ratio={rlx.tokens_per_s / direct.tokens_per_s:.3f}")


if __name__ == "__main__":
    main()

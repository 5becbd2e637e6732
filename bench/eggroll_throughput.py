"""EGGROLL population throughput: population evaluation vs plain batch inference, for each backend.

What it measures: generated tokens per second of wall time when N population members each
generate for P prompts (N*P sequences, exactly `max_new_tokens` tokens each: eos is ignored), divided
by the tokens per second of plain batch inference of the same model on the same N*P sequences and
tokens (no perturbation). Every sequence gets a distinct prompt (the arithmetic task's prompts), so
the two runs do identical token work and differ only in the weights each row sees.

  hf_batched  one HF generate over all N*P rows under the population forward (rlx/kernels);
              plain = the same HF generate call without it
  vllm_lora   vLLM, one LoRA adapter per member (members_per_batch adapters per call);
              plain = a vLLM engine without LoRA (the two engines alternate, one per run)
  inplace     vLLM, weights of each member written into the engine, its P rows generated, restored;
              plain = the same engine generating all N*P rows in one call

How: each backend runs in its own child process (its own engine; the peak memory of each phase is
the peak resident set size on CPU sampled every 5 ms, or torch's peak CUDA allocation on a GPU);
plain and population repeats are interleaved; the prefix cache is reset before each vLLM run; the
reported rate is the best over repeats (the run least disturbed by other load: on a shared 2-core
machine a neighbour's burst can halve one run), with the ratio of medians printed beside it.

    .venv/bin/python bench/eggroll_throughput.py --model tiny       # seconds
    .venv/bin/python bench/eggroll_throughput.py                     # SmolLM2-135M, minutes
    bench/eggroll_gpu.sh                      # GPU: random-initialised ~0.5B Llama-shaped model

The last line printed is `population_throughput_ratio=<ratio>`: the fastest population backend's
tokens/s against the fastest plain inference measured in the same run, whatever its engine (the
paper's 91% is against pure batch inference); the table keeps each backend's ratio against plain
inference on its own engine type as extra columns. Goal (the paper's figure): >= 0.91.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rlx.config.choices import ES_EVALUATORS as EVALUATORS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="smollm2", help='alias, HF folder, "tiny" or "random-0.5b" (built now)'
    )
    p.add_argument("--population", type=int, default=32, help="members N")
    p.add_argument("--prompts", type=int, default=4, help="prompts P per member (N*P sequences)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--sigma", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best and median)")
    p.add_argument("--hf-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--vllm-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--members-per-batch", type=int, default=64, help="vllm_lora adapters per call")
    p.add_argument("--backends", default=",".join(EVALUATORS))
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--worker", choices=EVALUATORS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class PeakMemory:
    """Peak memory inside a `with` block: CUDA allocations on a GPU, else resident set size."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS"))
        return int(line.split()[1]) * 1024

    def _poll(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def timed(fn) -> dict:
    """Run fn() once: tokens, seconds, peak memory."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        completions = fn()
        seconds = time.perf_counter() - start
    return {
        "tokens": sum(len(c.token_ids) for c in completions),
        "seconds": seconds,
        "peak_bytes": mem.peak,
    }


def setup_rows(args, tokenizer):
    """N*P distinct prompts (token ids) and the plan giving member m its P consecutive rows."""
    from rlx.es import PopulationPlan
    from rlx.rollout import encode_prompts
    from rlx.tasks import load_task_dataset

    need = args.population * args.prompts
    split = "test" if need <= 200 else "train"
    data = load_task_dataset("arithmetic", split, need, seed=0)
    rows = encode_prompts(tokenizer, data["prompt"])
    plan = PopulationPlan(
        list(range(args.population)),
        [list(range(m * args.prompts, (m + 1) * args.prompts)) for m in range(args.population)],
    )
    return rows, plan


def run_worker(args) -> dict:
    """One backend: interleaved plain / population repeats after a warm-up of each."""
    import torch

    from rlx.algos.eggroll import NoiseSpec, evolved_parameters
    from rlx.es import generate_rows, make_evaluator
    from rlx.hardware import auto_dtype
    from rlx.models import load_model_and_tokenizer
    from rlx.rollout import Sampling
    from rlx.rollout.hf_backend import HFEngine

    name = args.worker
    noise = NoiseSpec(seed=0, sigma=args.sigma, rank=args.rank)
    sampling = Sampling(n=1, max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = auto_dtype(args.hf_dtype) if name == "hf_batched" else "float32"
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    params = evolved_parameters(model, targets)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    rows, plan = setup_rows(args, tokenizer)
    everything = list(range(len(rows)))
    if name == "hf_batched":
        model = model.to(device)
        backend = make_evaluator(
            "hf_batched",
            model_name=args.model,
            noise=noise,
            shapes=shapes,
            model=model,
            tokenizer=tokenizer,
        )
        hf = HFEngine.from_model(model, tokenizer)  # all rows in one generate call
        plain = lambda: generate_rows(hf, rows, everything, sampling)  # noqa: E731
        engine = None
    elif name == "inplace":
        engine = vllm_engine(args, lora=False)
        backend = make_evaluator("inplace", engine=engine, noise=noise, centre=params)

        def plain():
            engine.llm.reset_prefix_cache()
            return generate_rows(engine, rows, everything, sampling)
    else:
        return vllm_lora_worker(args, noise, shapes, rows, plan, sampling)

    def population():
        if engine is not None:
            engine.llm.reset_prefix_cache()
        return backend.evaluate(rows, plan, 0, sampling)

    # Warm-up of both paths at full size: the population at epoch 1, so the timed runs (epoch 0)
    # draw their noise anew, as a new ES step does (vllm_lora: new adapters to write and load).
    backend.evaluate(rows, plan, 1, sampling)
    plain()
    runs = {"plain": [], "population": []}
    for _ in range(args.repeats):
        runs["plain"].append(timed(plain))
        runs["population"].append(timed(population))
    return {"backend": name, "device": device, **runs}


def vllm_engine(args, lora: bool):
    from rlx.es.vllm_lora import engine_lora_rank
    from rlx.rollout.vllm_backend import VLLMEngine

    return VLLMEngine(
        args.model,
        dtype=args.vllm_dtype,
        kv_cache_gib=args.kv_cache_gib,
        enable_lora=lora,
        max_loras=min(args.members_per_batch, args.population) + 1,
        max_lora_rank=engine_lora_rank(args.rank),
    )


def vllm_lora_worker(args, noise, shapes, rows, plan, sampling) -> dict:
    """Plain inference on an engine without LoRA vs the population on a LoRA-enabled engine. Only
    one vLLM engine lives in a process at a time, so the two alternate, one engine per run."""
    import torch

    from rlx.es import generate_rows, make_evaluator

    per_batch = min(args.members_per_batch, args.population)
    everything = list(range(len(rows)))
    runs = {"plain": [], "population": []}
    for _ in range(args.repeats):
        engine = vllm_engine(args, lora=False)
        generate_rows(engine, rows, everything, sampling)  # warm-up at full size
        engine.llm.reset_prefix_cache()
        runs["plain"].append(timed(lambda e=engine: generate_rows(e, rows, everything, sampling)))
        engine.close()
        engine = vllm_engine(args, lora=True)
        backend = make_evaluator(
            "vllm_lora",
            engine=engine,
            noise=noise,
            shapes=shapes,
            members_per_batch=per_batch,
        )
        # warm-up at full size with other adapters (epoch 1): the timed run writes and loads its
        # own, as every new ES step does
        backend.evaluate(rows, plan, 1, sampling)
        engine.llm.reset_prefix_cache()
        runs["population"].append(timed(lambda b=backend: b.evaluate(rows, plan, 0, sampling)))
        backend.close()
        engine.close()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"backend": "vllm_lora", "device": device, "members_per_batch": per_batch, **runs}


def summarize(result: dict) -> dict:
    """Best-of-repeats rates (the run least disturbed by other load) and the medians."""

    def rates(phase):
        return [r["tokens"] / r["seconds"] for r in result[phase]]

    out = {
        "backend": result["backend"],
        "population_tok_s": max(rates("population")),
        "plain_tok_s": max(rates("plain")),
        "population_tok_s_median": statistics.median(rates("population")),
        "plain_tok_s_median": statistics.median(rates("plain")),
        "tokens_per_run": result["population"][0]["tokens"],
        "plain_tokens_per_run": result["plain"][0]["tokens"],
        "seconds_plain": [round(r["seconds"], 2) for r in result["plain"]],
        "seconds_population": [round(r["seconds"], 2) for r in result["population"]],
        "peak_gib_plain": max(r["peak_bytes"] for r in result["plain"]) / 2**30,
        "peak_gib_population": max(r["peak_bytes"] for r in result["population"]) / 2**30,
    }
    out["ratio_same_engine"] = out["population_tok_s"] / out["plain_tok_s"]
    out["ratio_of_medians"] = out["population_tok_s_median"] / out["plain_tok_s_median"]
    return out


def build_random_llama(out_dir: Path, vocab: int = 32000) -> Path:
    """A random-initialised ~0.5B Llama-shaped model (24 layers, hidden 1024, MLP 4864, 16 heads,
    8 KV heads, untied 32k vocabulary) with the tiny tokenizer padded to the vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlx.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tokenizer))])
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=1024,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    print(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def resolve_model(args) -> str:
    """ "tiny" and "random-0.5b" are built in a temporary folder; anything else is resolved."""
    scratch = Path(tempfile.mkdtemp(prefix="rlx-bench-"))
    if args.model == "tiny":
        from rlx.models.tiny import build_tiny_model

        return str(build_tiny_model(scratch / "tiny"))
    if args.model == "random-0.5b":
        return str(build_random_llama(scratch / "random-0.5b"))
    from rlx.models import resolve_model as resolve

    return resolve(args.model)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return 0
    model = resolve_model(args)
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(
        f"model {args.model} ({model}), population {args.population} x {args.prompts} prompts, "
        f"{args.max_new_tokens} new tokens, rank {args.rank}, {args.repeats} repeats"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    summaries = {}
    for name in chosen:
        cmd = [sys.executable, __file__, "--worker", name, "--model", model]
        for key, value in vars(args).items():
            if key not in ("worker", "model", "backends"):
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        child = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
        if child.returncode != 0 or line is None:
            print(f"{name}: FAILED\n{child.stderr[-3000:]}")
            continue
        summaries[name] = summarize(json.loads(line[len("RESULT ") :]))
    report(summaries)
    if not summaries:
        return 1
    fastest_plain = max(summaries.values(), key=lambda s: s["plain_tok_s"])
    best = max(summaries.values(), key=lambda s: s["population_tok_s"])
    print(f"fastest plain engine: {fastest_plain['backend']}'s; best backend: {best['backend']}")
    ratio = best["population_tok_s"] / fastest_plain["plain_tok_s"]
    print(f"population_throughput_ratio={ratio:.3f}")
    return 0


def report(summaries: dict) -> None:
    fastest_plain = max((s["plain_tok_s"] for s in summaries.values()), default=0.0)
    head = (
        f"{'backend':<11} {'pop tok/s':>10} {'plain tok/s':>11} {'ratio':>6} {'median':>6} "
        f"{'vs fastest plain':>16} {'peak GiB plain/pop':>19}"
    )
    print(head)
    for s in summaries.values():
        print(
            f"{s['backend']:<11} {s['population_tok_s']:>10.1f} {s['plain_tok_s']:>11.1f} "
            f"{s['ratio_same_engine']:>6.3f} {s['ratio_of_medians']:>6.3f} "
            f"{s['population_tok_s'] / fastest_plain:>16.3f} "
            f"{s['peak_gib_plain']:>9.2f}/{s['peak_gib_population']:<9.2f}"
        )
    for s in summaries.values():
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}))


if __name__ == "__main__":
    sys.exit(main())

"""EGGROLL evolution strategies: train a causal LM with no backpropagation.

    python recipes/es.py --config recipes/es.yaml [key.sub=value ...]
    python recipes/es.py --show-config                    # every knob, with defaults and help
    accelerate launch --config_file launch/cpu_2proc.yaml recipes/es.py --config recipes/es.yaml

Each step: the `prompts_per_step` training prompts are answered by `es.population_size` members,
member i using weights W + E_i, E_i = A_i B_i^T regenerated from (seed, parameter, step, i // 2)
(rlx/algos/eggroll.py) -> each member's fitness is the mean task reward (the weighted total of the
task's rewards, rlx.rewards.score_rollout) over its completions -> fitness shaping -> the update
(1/N) sum_i f~_i E_i / sigma goes to a torch optimizer (SGD by default) -> the new weights are synced
into the population backend (and, for hf_batched, into the rollout engine before the held-out
evaluation, its only user). Population evaluation: `es.backend` =
hf_batched (one batched HF forward for all members, rlx/kernels), vllm_lora (one LoRA adapter per
member) or inplace (perturb the engine's weights member by member, then restore).

Deviations from the paper, on purpose: the learning rate is defined on unit-scale noise directions
(see rlx/algos/eggroll.py: lr_reference = lr / (sigma sqrt(N))); only nn.Linear weights evolve
(embeddings, norms, biases stay frozen, as in the reference's LLM runs); members answer every step
prompt by default (es.prompt_assignment=grouped gives the reference's one-prompt-per-group layout).

Several processes: population members are split across ranks; every rank regenerates all noise from
seeds and computes the same update from the gathered [members, prompts] score matrix, so only
fitness scalars cross processes. Outputs in `output_dir`: metrics.jsonl, eval.json,
reward_curves.png, config.yaml, checkpoints/, final/ (the trained model), tensorboard logs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np
import torch

from rlx import distributed
from rlx.algos.eggroll import (
    NoiseSpec,
    evolved_parameters,
    fitness_snr,
    make_optimizer,
    set_es_gradients,
    shape_fitness,
)
from rlx.config import ConfigError, ESConfig
from rlx.data import step_prompt_indices
from rlx.es import make_backend, plan_population, score_matrix, split_members
from rlx.es.vllm_lora import engine_lora_rank
from rlx.hardware import auto_dtype, describe_choice
from rlx.models import load_model_and_tokenizer
from rlx.recipe import Run, load_data, run_recipe
from rlx.rollout import Sampling, encode_prompts, engine_dtype, make_engine
from rlx.rollout.sync import push_weights

# Default adapters per vLLM call: each holds an adapter slot (memory grows with members x rank);
# 32 adapters a call ran 14% faster than 16 (bench/eggroll_throughput.py, SmolLM2, AVX-512 bf16).
VLLM_MEMBERS_PER_BATCH = 64


def main(argv: list[str] | None = None) -> int:
    return run_recipe(ESConfig, train, argv, __doc__, "es")


def train(cfg: ESConfig) -> dict:
    """Run the loop; return eval.json's content."""
    run = Run(cfg, nan_on_skip=("update_norm", "update_rms_over_sigma", "fitness_snr"))
    world, rank, es = run.world, run.rank, cfg.es
    try:
        members = split_members(es.population_size, world, rank)
    except ValueError as err:
        raise ConfigError(f"es.population_size: {err}") from None
    if cfg.rollout.backend == "server" and world > 1:
        raise ConfigError(
            "recipes/es.py with rollout.backend=server runs in one process (each process would "
            "push its weights to the servers): launch one process, or use rollout.backend=vllm"
        )
    if run.main:
        print(f"es: {world} process(es), population {es.population_size} on {es.backend}")
        population = auto_dtype(es.population_dtype) if es.backend == "hf_batched" else None
        print(describe_choice(engine=engine_dtype(cfg.rollout), population=population or "engine"))

    # ---- master weights, data, rewards, engines
    # Not frozen on purpose (no autograd runs: generation is under no_grad, gradients are written
    # by hand): a frozen lm_head makes HF prefill very slow on CPU (rlx/es/hf_batched.py).
    master, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype=cfg.model.dtype)
    params = evolved_parameters(master, es.target_modules)  # name -> Parameter, updated here
    train_data, eval_data, reward_fns = load_data(cfg, tokenizer)
    noise = NoiseSpec(cfg.seed, es.sigma, es.rank, es.noise_reuse, es.noise)
    optimizer = make_optimizer(es.optimizer, params.values(), es.lr, es.momentum, es.weight_decay)
    warmup = max(es.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    engine, backend = build_population(
        cfg, master, tokenizer, params, noise, len(members), run.main
    )
    if run.resume(master, optimizer, scheduler):
        sync(cfg, backend, engine, params)
    run.start(engine, eval_data, reward_fns)

    # ---- training
    sampling = Sampling.from_config(cfg.rollout, n=1)  # samples are laid out as rows
    while run.step < cfg.steps:
        t0 = time.perf_counter()
        idx = step_prompt_indices(run.step, cfg.prompts_per_step, len(train_data), cfg.seed)
        rows = train_data.select(idx)
        plan = plan_population(
            es.population_size, len(rows), es.prompt_assignment, members, cfg.rollout.num_samples
        )
        # Sampled decoding draws from torch's global generator: seed it per (step, rank) so that a
        # resumed run samples what an uninterrupted one would have.
        torch.manual_seed(cfg.seed * 1_000_003 + run.step * 1_009 + rank)
        prompts = encode_prompts(tokenizer, rows["prompt"])
        completions = backend.evaluate(prompts, plan, run.step, sampling)
        t_population = time.perf_counter() - t0
        scores = run.score(rows, completions, reward_fns)  # None: skipped on every rank
        if scores is None:
            continue
        t_reward = time.perf_counter() - t0 - t_population

        # Only scalars cross processes: failure flags, the score matrix, reward sums.
        local = local_stats(plan, scores, completions, len(rows), t_population)
        full = {k: distributed.gather(v) for k, v in local.items()}  # rank order = member order

        t1 = time.perf_counter()
        shaped = shape_fitness(es.fitness_shaping, full["scores"])  # [N]
        update_norm = set_es_gradients(noise, params, run.step, shaped)
        moved = optimizer_step(optimizer, params)  # RMS change of the evolved weights
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t1
        t2 = time.perf_counter()
        sync(cfg, backend, engine, params)
        t_sync = time.perf_counter() - t2
        run.step += 1

        if run.main:
            t_members = float(full["seconds"].max())
            times = {
                "population": t_members,
                "reward": t_reward,
                "update": t_update,
                "sync": t_sync,
            }
            step_s, lr = time.perf_counter() - t0, scheduler.get_last_lr()[0]
            update = {"update_norm": update_norm, "update_rms_over_sigma": moved / es.sigma}
            row = step_metrics(run.step, full, shaped, reward_fns, update, times, step_s, lr)
            run.log_step(row, reward=row["reward_mean"], fit_std=row["fitness_std"])
        if run.end_step(time.perf_counter() - t0, master, optimizer, scheduler):
            break

    sync(cfg, backend, engine, params, to_engine=True)  # the held-out evaluation's weights
    title = f"{cfg.model.name} on {cfg.task.name} ({cfg.eval.split}, greedy) after ES"
    results = run.finish(master, tokenizer, engine, eval_data, reward_fns, title)
    backend.close()  # backends never close the engine they were given: its owner does
    if engine is not None:
        engine.close()
    run.close()
    return results


# ----------------------------------------------------------------------------- the step's pieces


def build_population(
    cfg: ESConfig, master, tokenizer, params, noise, local_members: int, main_proc: bool = True
):
    """(rollout engine, population backend). vllm_lora and inplace evaluate on the engine itself;
    hf_batched keeps a model copy in es.population_dtype (or uses the master), and then only the
    main process, which runs the held-out evaluation, builds an engine."""
    es, rollout = cfg.es, cfg.rollout
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    if es.backend == "vllm_lora":
        per_batch = es.members_per_batch or min(local_members, VLLM_MEMBERS_PER_BATCH)
        lora = {"max_loras": per_batch + 1, "max_lora_rank": engine_lora_rank(es.rank)}
        rollout = dataclasses.replace(rollout, enable_lora=True, **lora)
        engine = make_engine(rollout.backend, cfg.model.name, rollout)
        backend = make_backend(
            "vllm_lora", engine=engine, noise=noise, shapes=shapes, members_per_batch=per_batch
        )
        return engine, backend
    engine = None
    if es.backend == "inplace" or (cfg.eval.enabled and main_proc):
        engine = make_engine(rollout.backend, cfg.model.name, rollout)
    if es.backend == "inplace":
        return engine, make_backend("inplace", engine=engine, noise=noise, centre=params)
    population_dtype = auto_dtype(es.population_dtype)
    shared = population_dtype == cfg.model.dtype  # no copy needed: evaluate on the master
    backend = make_backend(
        "hf_batched",
        model_name=cfg.model.name,
        noise=noise,
        shapes=shapes,
        dtype=population_dtype,
        members_per_batch=es.members_per_batch,
        model=master if shared else None,
        tokenizer=tokenizer if shared else None,
    )
    return engine, backend


def sync(cfg: ESConfig, backend, engine, params, to_engine: bool = False) -> None:
    """Push the evolved weights into the backend and, with `to_engine`, into the rollout engine
    when it is separate (hf_batched: the engine only runs the held-out evaluation, so the loop
    skips that copy on every step and makes it before the evaluation)."""
    named = [(name, p.detach()) for name, p in params.items()]
    backend.sync(named)
    if to_engine and engine is not None and cfg.es.backend == "hf_batched":
        push_weights(engine, lambda: [named])


def optimizer_step(optimizer, params) -> float:
    """optimizer.step(); return the RMS of the change it made to the evolved weights (one copy of
    them is held meanwhile), the figure to compare with sigma, the noise's RMS per entry."""
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer.step()
    sq = sum(float((p.detach() - before[n]).double().pow(2).sum()) for n, p in params.items())
    return math.sqrt(sq / sum(p.numel() for p in params.values()))


def local_stats(plan, scores, completions, num_prompts: int, seconds: float) -> dict:
    """This rank's tensors to gather: score matrix [n, P], reward sums [1, K], tokens, time."""
    per_fn = np.nan_to_num(scores.per_function, nan=0.0)  # None (not applicable) counts as 0
    return {
        "scores": score_matrix(plan, scores.total, num_prompts),  # [n_local, P]
        "per_fn_sum": torch.tensor(per_fn.sum(0, keepdims=True), dtype=torch.float64),  # [1, K]
        "count": torch.tensor([float(len(completions))], dtype=torch.float64),
        "tokens": torch.tensor([float(sum(len(c.token_ids) for c in completions))]),
        "seconds": torch.tensor([seconds]),
    }


def step_metrics(step, full, shaped, reward_fns, update, times, step_time, lr) -> dict:
    """One metrics.jsonl row; `update`: the update's figures (update_norm, ...)."""
    scores = full["scores"]  # [N, P]
    fitness = scores.nanmean(dim=1)  # [N]
    count, tokens = float(full["count"].sum()), float(full["tokens"].sum())
    row = {
        "step": step,
        "reward_mean": float(scores.nanmean()),
        "reward_max": float(fitness.max()),
        "reward_min": float(fitness.min()),
        "fitness_std": float(fitness.std(unbiased=False)),
        "shaped_abs_mean": float(shaped.abs().mean()),
        "fitness_snr": fitness_snr(scores),
        **update,
        "lr": lr,
    }
    per_fn = full["per_fn_sum"].sum(0) / count
    for k, fn in enumerate(reward_fns):
        row[f"reward/{fn.name}"] = float(per_fn[k])
    row |= {
        "completion_tokens_mean": tokens / count,
        "tokens": tokens,
        "tokens_per_s": tokens / max(times["population"], 1e-9),
        "step_time_s": step_time,
    }
    row |= {f"time_{k}_s": v for k, v in times.items()}
    return row


if __name__ == "__main__":
    sys.exit(main())

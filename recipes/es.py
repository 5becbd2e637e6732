"""EGGROLL evolution strategies: train a causal LM with no backpropagation.

    python recipes/es.py --config recipes/es.yaml [key.sub=value ...]
    python recipes/es.py --show-config                    # every knob, with defaults and help
    accelerate launch --config_file launch/cpu_2proc.yaml recipes/es.py --config recipes/es.yaml

Each step: the `prompts_per_step` training prompts are answered by `es.population_size` members,
member i using weights W + E_i, E_i = A_i B_i^T regenerated from (seed, parameter, step, i // 2)
(rlx/algos/eggroll.py) -> each member's fitness is the mean task reward (the weighted total of the
task's rewards, rlx.evaluation.score_rollout) over its completions -> fitness shaping -> the update
(1/N) sum_i f~_i E_i / sigma goes to a torch optimizer (SGD by default) -> the new weights are synced
into the population backend and the rollout engine. Population evaluation: `es.backend` =
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
from accelerate import Accelerator
from tqdm.auto import tqdm

from rlx.algos.eggroll import (
    NoiseSpec,
    evolved_parameters,
    make_optimizer,
    set_es_gradients,
    shape_fitness,
)
from rlx.checkpoint import checkpoint, find_checkpoint, load_checkpoint
from rlx.config import ConfigError, save_config, to_dict
from rlx.data import load_prompts, step_prompt_indices
from rlx.es import make_backend, plan_population, score_matrix, split_members
from rlx.es.vllm_lora import engine_lora_rank
from rlx.es_config import ESConfig
from rlx.evaluation import evaluate, resolve_rewards, score_rollout
from rlx.hardware import auto_dtype, describe_choice
from rlx.metrics import MetricsLog, truncate_metrics
from rlx.models import load_model_and_tokenizer
from rlx.recipe import RunClock, finish_run, prepare_output_dir, run_recipe, shutdown
from rlx.reporting import read_eval, write_eval
from rlx.rewards import RewardError
from rlx.rollout import Sampling, encode_prompts, engine_dtype, make_engine

VLLM_MEMBERS_PER_BATCH = 16  # default adapters per vLLM call (each costs a slot and ~20 ms to load)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(ESConfig, train, argv, __doc__, "es")


def train(cfg: ESConfig) -> dict:
    """Run the loop; return eval.json's content."""
    clock = RunClock(cfg.max_minutes, cfg.max_run_minutes)
    accelerator = Accelerator(log_with=list(cfg.log_with) or None, project_dir=cfg.output_dir,
                              cpu=not torch.cuda.is_available())  # fmt: skip
    out = prepare_output_dir(cfg, accelerator)
    world, rank, main_proc = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
    )
    try:
        members = split_members(cfg.es.population_size, world, rank)
    except ValueError as err:
        raise ConfigError(f"es.population_size: {err}") from None
    if main_proc:
        print(f"es: {world} process(es), population {cfg.es.population_size} on {cfg.es.backend}")
        population = auto_dtype(cfg.es.population_dtype) if cfg.es.backend == "hf_batched" else None
        print(describe_choice(engine=engine_dtype(cfg.rollout), population=population or "engine"))
    torch.manual_seed(cfg.seed)

    # ---- master weights, data, rewards, engines
    # Not frozen on purpose (no autograd runs: generation is under no_grad, gradients are written
    # by hand): a frozen lm_head makes HF prefill very slow on CPU (rlx/es/hf_batched.py).
    master, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype=cfg.model.dtype)
    params = evolved_parameters(master, cfg.es.target_modules)  # name -> Parameter, updated here
    train_data = load_prompts(cfg.task, cfg.task.split, cfg.task.num_prompts, tokenizer,
                              cfg.max_prompt_tokens, cfg.long_prompts)  # fmt: skip
    eval_data = None
    if cfg.eval.enabled:
        eval_data = load_prompts(cfg.task, cfg.eval.split, cfg.eval.num_prompts, tokenizer,
                                 cfg.max_prompt_tokens, cfg.long_prompts)  # fmt: skip
    reward_fns = resolve_rewards(cfg.task.name, cfg.rewards)
    noise = NoiseSpec(cfg.seed, cfg.es.sigma, cfg.es.rank, cfg.es.noise_reuse, cfg.es.noise)
    optimizer = make_optimizer(cfg.es.optimizer, params.values(), cfg.es.lr, cfg.es.momentum,
                               cfg.es.weight_decay)  # fmt: skip
    warmup = max(cfg.es.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    engine, backend = build_population(cfg, master, tokenizer, params, noise, len(members),
                                       main_proc)  # fmt: skip

    start_step = 0
    if cfg.resume_from:
        ckpt = find_checkpoint(out, cfg.resume_from)
        start_step = load_checkpoint(ckpt, master, optimizer, scheduler)["step"]
        sync(cfg, backend, engine, params)
        if main_proc:
            truncate_metrics(out / "metrics.jsonl", start_step)
            print(f"resumed from {ckpt} at step {start_step}")
    log = None
    if main_proc:
        save_config(cfg, str(out / "config.yaml"))
        log = MetricsLog(out / "metrics.jsonl", accelerator)
    accelerator.init_trackers("rlx", config={k: str(v) for k, v in to_dict(cfg).items()})

    results = read_eval(out / "eval.json") if start_step else {}
    if eval_data is not None and main_proc and "before" not in results:
        results["before"] = evaluate(engine, eval_data, reward_fns, cfg.eval.max_new_tokens,
                                     cfg.rollout.stop)  # fmt: skip
        write_eval(out / "eval.json", results)

    # ---- training
    sampling = Sampling.from_config(cfg.rollout, n=1)  # samples are laid out as rows
    began = time.perf_counter()
    clock.start_training(results.get("before", {}).get("generate_seconds", 0.0))
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc="training", disable=not main_proc)
    while step < cfg.steps:
        t0 = time.perf_counter()
        rows = train_data.select(
            step_prompt_indices(step, cfg.prompts_per_step, len(train_data), cfg.seed)
        )
        plan = plan_population(cfg.es.population_size, len(rows), cfg.es.prompt_assignment,
                               members, cfg.rollout.num_samples)  # fmt: skip
        # Sampled decoding draws from torch's global generator: seed it per (step, rank) so that a
        # resumed run samples what an uninterrupted one would have.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        completions = backend.evaluate(encode_prompts(tokenizer, rows["prompt"]), plan, step,
                                       sampling)  # fmt: skip
        t_population = time.perf_counter() - t0
        failure = None
        try:
            scores = score_rollout(rows, completions, reward_fns)
        except RewardError as err:
            failure, scores = err, None
        t_reward = time.perf_counter() - t0 - t_population

        # Only scalars cross processes: failure flags, the score matrix, reward sums.
        failed = accelerator.gather(torch.tensor([float(failure is not None)]))
        if failed.any():
            if cfg.bad_steps == "error":
                raise failure or RewardError("a reward function failed on another process")
            step = skip_step(
                log, bar, step, f"reward function failed: {failure or 'on another rank'}"
            )
            continue
        local = local_stats(plan, scores, completions, len(rows), t_population)
        full = {k: accelerator.gather(v) for k, v in local.items()}  # rank order = member order

        t1 = time.perf_counter()
        shaped = shape_fitness(cfg.es.fitness_shaping, full["scores"])  # [N]
        update_norm = set_es_gradients(noise, params, step, shaped)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t1
        t2 = time.perf_counter()
        sync(cfg, backend, engine, params)
        t_sync = time.perf_counter() - t2
        step += 1

        if main_proc:
            times = {"population": float(full["seconds"].max()), "reward": t_reward,
                     "update": t_update, "sync": t_sync}  # fmt: skip
            row = step_metrics(step, full, shaped, reward_fns, update_norm, times,
                               time.perf_counter() - t0, scheduler.get_last_lr()[0])  # fmt: skip
            log.log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", fit_std=f"{row['fitness_std']:.3f}")
        out_of_time = clock.out_of_time(time.perf_counter() - t0, accelerator)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or out_of_time:
            checkpoint(accelerator, out, step, master, optimizer, scheduler, cfg)
        if out_of_time:
            if main_proc:
                print(f"stopping after {step} steps: {out_of_time}")
            break
    bar.close()

    # ---- the trained model as a plain HF folder, held-out evaluation, report
    if main_proc:
        title = f"{cfg.model.name} on {cfg.task.name} ({cfg.eval.split}, greedy) after ES"
        finish_run(cfg, out, master, tokenizer, engine, eval_data, reward_fns, results, began,
                   step, title)  # fmt: skip
    backend.close()  # backends never close the engine they were given: its owner does
    if engine is not None:
        engine.close()
    shutdown(accelerator)
    return results


# ----------------------------------------------------------------------------- the step's pieces


def build_population(cfg: ESConfig, master, tokenizer, params, noise, local_members: int,
                     main_proc: bool = True):  # fmt: skip
    """(rollout engine, population backend). vllm_lora and inplace evaluate on the engine itself;
    hf_batched keeps a model copy in es.population_dtype (or uses the master), and then only the
    main process, which runs the held-out evaluation, builds an engine."""
    es, rollout = cfg.es, cfg.rollout
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    if es.backend == "vllm_lora":
        per_batch = es.members_per_batch or min(local_members, VLLM_MEMBERS_PER_BATCH)
        rollout = dataclasses.replace(rollout, enable_lora=True, max_loras=per_batch + 1,
                                      max_lora_rank=engine_lora_rank(es.rank))  # fmt: skip
        engine = make_engine(rollout.backend, cfg.model.name, rollout)
        backend = make_backend("vllm_lora", engine=engine, noise=noise, shapes=shapes,
                               members_per_batch=per_batch)  # fmt: skip
        return engine, backend
    engine = None
    if es.backend == "inplace" or (cfg.eval.enabled and main_proc):
        engine = make_engine(rollout.backend, cfg.model.name, rollout)
    if es.backend == "inplace":
        return engine, make_backend("inplace", engine=engine, noise=noise, centre=params)
    population_dtype = auto_dtype(es.population_dtype)
    shared = population_dtype == cfg.model.dtype  # no copy needed: evaluate on the master
    backend = make_backend("hf_batched", model_name=cfg.model.name, noise=noise, shapes=shapes,
                           dtype=population_dtype, members_per_batch=es.members_per_batch,
                           model=master if shared else None,
                           tokenizer=tokenizer if shared else None)  # fmt: skip
    return engine, backend


def sync(cfg: ESConfig, backend, engine, params) -> None:
    """Push the evolved weights into the backend and, when it is separate, the rollout engine."""
    named = [(name, p.detach()) for name, p in params.items()]
    backend.sync(named)
    if engine is not None and cfg.es.backend == "hf_batched":
        engine.update_weights(named)


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


def step_metrics(step, full, shaped, reward_fns, update_norm, times, step_time, lr) -> dict:
    """One metrics.jsonl row."""
    scores = full["scores"]  # [N, P]
    fitness = scores.nanmean(dim=1)  # [N]
    count, tokens = float(full["count"].sum()), float(full["tokens"].sum())
    row = {
        "step": step, "reward_mean": float(scores.nanmean()), "reward_max": float(fitness.max()),
        "reward_min": float(fitness.min()), "fitness_std": float(fitness.std(unbiased=False)),
        "shaped_abs_mean": float(shaped.abs().mean()), "update_norm": update_norm, "lr": lr,
    }  # fmt: skip
    per_fn = full["per_fn_sum"].sum(0) / count
    for k, fn in enumerate(reward_fns):
        row[f"reward/{fn.name}"] = float(per_fn[k])
    row |= {
        "completion_tokens_mean": tokens / count, "tokens": tokens,
        "tokens_per_s": tokens / max(times["population"], 1e-9), "step_time_s": step_time,
    }  # fmt: skip
    row |= {f"time_{k}_s": v for k, v in times.items()}
    return row


def skip_step(log, bar, step: int, reason: str) -> int:
    """Log a skipped step (bad_steps=skip) and move on."""
    if log is not None:
        log.log({"step": step + 1, "skipped": reason, "reward_mean": math.nan,
                 "update_norm": math.nan, "step_time_s": math.nan})  # fmt: skip
        bar.update(1)
    print(f"step {step + 1} skipped: {reason}", file=sys.stderr)
    return step + 1


if __name__ == "__main__":
    sys.exit(main())

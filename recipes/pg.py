"""Policy-gradient training: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE(++) in one loop.

    accelerate launch recipes/pg.py --config recipes/grpo.yaml [key.sub=value ...]
    python recipes/pg.py --config recipes/grpo.yaml              # one process, same thing

Each step: sample `rollout.num_samples` completions for `prompts_per_step` training prompts on the
rollout engine (vLLM by default) -> score them -> group advantages over the kept groups ->
`algo.ppo_epochs` passes over `algo.mini_batches` mini-batches, one clipped policy-gradient update
(micro-batched) each -> push the new weights into the engine. The math lives in rlx/algos/pg.py;
the learner is chosen by `algo.*` (recipes/grpo.yaml, rloo.yaml, reinforce.yaml).

By default one optimizer step per rollout batch (ppo_epochs = mini_batches = 1): the trainer's
logprobs at update time are the "old" ones, so the clipped ratio is 1 and only importance sampling
(`algo.tis_*`) corrects the vLLM/trainer mismatch. With more updates per batch the old logprobs
are taken once, before the first, and the clip bounds act. The KL term (off by default) is added
to the loss, not folded into the reward.

Several processes: each rank generates and scores its share of the step's prompts; rewards are
gathered so advantages, REINFORCE's global whitening and dynamic sampling see the whole batch.
Each rank divides its loss by the whole mini-batch's sequence and token counts (gathered) and
multiplies it by the number of ranks, so that DDP's gradient average is the gradient of the batch
loss one process would compute (TRL does this for loss_type "dapo" only).
What is trained is the `adapter:` section's (docs/adapters.md): all weights or a PEFT adapter, the
principal guard and AdaLoRA's allocation as optimizer step hooks, AdaLoRA's orthogonality penalty
in the loss, the spectral probe's diag/* metrics, and merged or adapter-only weight sync.
Outputs in `output_dir`: metrics.jsonl, eval.json, reward_curves.png,
config.yaml, checkpoints/, tensorboard logs.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial

import numpy as np
import torch
from transformers import get_scheduler

from rlx import adapters, distributed, sharding
from rlx.algos import pg
from rlx.config import AdapterConfig, ConfigError, PGConfig
from rlx.data import load_held_out, load_prompts, step_prompt_indices
from rlx.evaluation import resolve_rewards, score_rollout
from rlx.hardware import autocast_enabled, describe_choice
from rlx.metrics import peak_gpu_gib, peak_rss_gib
from rlx.policy import (
    MiniBatch,
    RolloutBatch,
    build_batch,
    completion_logits,
    export_weights,
    load_policy,
    matmul_params,
)
from rlx.recipe import Run, combine_stats, reduce_stats, run_recipe
from rlx.rewards import RewardError
from rlx.rollout import Sampling, engine_dtype, make_engine
from rlx.weighting import start_weighting

# per-update stats summed over micro-batches and ranks; the extremes are in train_on_batch
STAT_SUMS = (
    "loss",
    "clip_low",
    "clip_high",
    "entropy",
    "kl",
    "gap_sum",
    "tis_sum",
    "tis_zero",
    "tokens",
    "flops",
)


EXTREMES_MAX = (
    "gap_max",
    "tis_max",
    "ratio_dev_max",
    "peak_rss_gib",
    "peak_gpu_gib",
)  # reduced by max over ranks and updates
EXTREMES_MIN = ("tis_min",)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PGConfig, train, argv, __doc__, "pg")


def train(cfg: PGConfig) -> dict:
    """Run the loop; return eval.json's content."""
    run = Run(cfg, nan_on_skip=("loss", "logprob_gap_max"))
    accelerator, world, rank = run.accelerator, run.world, run.rank
    announce(cfg, run)

    # ---- models, data, rewards, rollout engine
    updates_per_step = cfg.algo.ppo_epochs * cfg.algo.mini_batches
    model, tokenizer = load_policy(cfg.model, cfg.adapter, total_steps=cfg.steps * updates_per_step)
    train_data, eval_data, reward_fns = load_data(cfg, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward_params = matmul_params(model)  # for the train FLOP/s metric
    optimizer, scheduler = make_optimizer(cfg, trainable)
    engine = make_rollout_engine(cfg, rank)
    sharding.configure(accelerator, cfg.optim.max_grad_norm, cfg.adapter.enabled)
    adapters.check_probe_sharding(cfg.adapter, sharding.zero_stage(accelerator))
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    ref_model = load_reference(cfg, accelerator) if cfg.algo.kl_beta > 0 else None
    hooks = adapters.install_step_hooks(policy, optimizer, cfg.adapter)  # before resume: W0
    probe = adapters.make_probe(policy, cfg.adapter)
    print(f"pg: rank {rank}: {sharding.describe(accelerator, policy)}")
    saved = model if sharding.zero_stage(accelerator) else policy  # DeepSpeed saves shards
    if run.resume(saved, optimizer, scheduler) or cfg.rollout.backend == "server":
        sync_weights(engine, policy, accelerator)  # a server may hold another run's weights
    hooks.resume(run.step * updates_per_step, run.resumed_tensors)  # AdaLoRA's allocator
    weighting = start_weighting(cfg, run, engine, eval_data, reward_fns, policy)  # None: static
    run.start(engine, eval_data, reward_fns)

    # ---- training
    sampling = Sampling.from_config(cfg.rollout)
    while run.step < cfg.steps:
        t0 = time.perf_counter()
        idx = step_prompt_indices(run.step, cfg.prompts_per_step, len(train_data), cfg.seed)
        rows = train_data.select(idx[rank::world])
        # In-process vLLM samples with torch's global generator: seeding it per step makes a
        # resumed run sample exactly what an uninterrupted run would have.
        torch.manual_seed(cfg.seed * 1_000_003 + run.step)
        completions = engine.generate(rows["prompt"], sampling)
        t_rollout = time.perf_counter() - t0
        scores, failure = score_or_failure(rows, completions, reward_fns)
        if distributed.agree(failure is not None):  # every rank skips (or stops) together
            if cfg.bad_steps == "error":
                raise failure or RewardError("a reward function failed on another process")
            run.skip(f"reward function failed: {failure or 'on another process'}")
            continue
        t_reward = time.perf_counter() - t0 - t_rollout

        # Rewards of every rank -> advantages and kept groups of the whole step -> this rank's.
        full = gather_rewards(scores, completions, cfg.rollout.num_samples)
        mine, pad = slice(rank * len(rows), (rank + 1) * len(rows)), tokenizer.pad_token_id
        algo, weights = cfg.algo, [fn.weight for fn in reward_fns]
        if weighting is not None:  # this step's weights (gradient: one pass per objective first)
            args = (cfg, accelerator, model, ref_model, completions, mine, pad)
            lr = scheduler.get_last_lr()[0]
            full, weights = weighting.reweigh(full, partial(objective_backward, *args), lr)
        total, per_fn, lengths = full["total"], full["per_fn"], full["length"]
        advantages, keep = pg.kept_advantages(
            algo.advantage,
            total,
            per_fn,
            lengths,
            weights,
            algo.reward_normalization,
            algo.dynamic_sampling,
            scale_rewards=algo.scale_rewards,
        )
        if weighting is not None:  # after the normalisation, so that no estimator cancels it
            advantages = advantages * weighting.factor

        t1 = time.perf_counter()
        stats = None
        if keep.any():
            parts = mini_batch_parts(keep, algo.mini_batches)  # [P]
            num_parts, adv = int(parts.max()) + 1, advantages[mine]
            batches = local_mini_batches(cfg, completions, parts[mine], adv, pad, num_parts)
            updates = update_policy(
                cfg, accelerator, model, ref_model, optimizer, trainable, batches, forward_params
            )
            stats = merge_updates(updates) if updates else None  # None: every token masked
            if stats is not None and not math.isfinite(stats["loss"]):  # the same on every rank
                optimizer.zero_grad(set_to_none=True)
                if cfg.bad_steps == "error":
                    raise FloatingPointError(
                        f"step {run.step + 1}: the loss is not finite; lower optim.lr or set "
                        "bad_steps=skip"
                    )
                run.skip("non-finite loss")
                continue
            if stats is not None:
                scheduler.step()
        t_train = time.perf_counter() - t1

        t2 = time.perf_counter()
        if stats is not None and (run.step + 1) % cfg.sync_every == 0:
            sync_weights(engine, policy, accelerator)
        t_sync = time.perf_counter() - t2
        run.step += 1
        hv = weighting.after_step(run.step, engine, eval_data) if weighting else {}

        if run.main:
            times = {"rollout": t_rollout, "reward": t_reward, "train": t_train, "sync": t_sync}
            times |= hooks.pop_seconds()  # the principal guard's and AdaLoRA's share of train
            step_s, lr = time.perf_counter() - t0, scheduler.get_last_lr()[0]
            row = step_metrics(
                run.step, full, keep, advantages, reward_fns, stats, times, step_s, lr
            )
            row |= adapters.diagnostics_row(probe, policy, run.step, cfg.adapter.diagnostics_every)
            run.log_step(row | hv, reward=row["reward_mean"], gap=row["logprob_gap_max"])
        extra = {"weighting": weighting.state_dict()} if weighting is not None else None
        state = (saved, optimizer, scheduler, extra, hooks.state_dict)  # + AdaLoRA's allocator
        if run.end_step(time.perf_counter() - t0, *state):
            break

    title = f"{cfg.model.name} on {cfg.task.name} ({cfg.eval.split}, greedy)"
    results = run.finish(policy, tokenizer, engine, eval_data, reward_fns, title)
    engine.close()
    run.close()
    return results


# ----------------------------------------------------------------------------- the step's pieces


def announce(cfg: PGConfig, run: Run) -> None:
    """Check the process count against the batch and print what this run does."""
    if cfg.prompts_per_step % run.world:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {run.world} "
            "processes"
        )
    if run.main:
        device, learner = run.accelerator.device, cfg.algo.advantage
        links = f", collectives over {distributed.backend()}" if distributed.active() else ""
        print(f"pg: {run.world} process(es) on {device}{links}, learner {learner}")
        trainer = "bfloat16 autocast" if autocast_enabled(cfg.bf16_autocast) else "float32"
        print(describe_choice(engine=engine_dtype(cfg.rollout), trainer=trainer))


def load_reference(cfg: PGConfig, accelerator):
    """The frozen reference model of the KL term: the initial policy, without an adapter, on the
    trainer's device (under ZeRO-3 sharded like the policy, rlx.sharding.prepare_frozen)."""
    ref_model, _ = load_policy(cfg.model, AdapterConfig())
    return sharding.prepare_frozen(accelerator, ref_model.eval().requires_grad_(False))


def score_or_failure(rows, completions, reward_fns):
    """(scores, None), or (None, the RewardError) when a reward function failed on this rank."""
    try:
        return score_rollout(rows, completions, reward_fns), None
    except RewardError as err:
        return None, err


def load_data(cfg: PGConfig, tokenizer):
    """The training prompts, the held-out ones (None without eval) and the reward functions."""
    task = cfg.task
    train_data = load_prompts(
        task, task.split, task.num_prompts, tokenizer, cfg.max_prompt_tokens, cfg.long_prompts
    )
    return train_data, load_held_out(cfg, tokenizer), resolve_rewards(task.name, cfg.rewards)


def make_rollout_engine(cfg: PGConfig, rank: int):
    """The rollout engine; with adapter.sync=adapter it serves the adapter through LoRA requests
    (rlx.adapters.sync_engine; versions saved under output_dir/adapter_sync)."""
    engine = make_engine(cfg.rollout.backend, cfg.model.name, cfg.rollout, rank)
    folder = f"{cfg.output_dir}/adapter_sync"
    push_base = cfg.rollout.backend == "server"  # a server may hold another run's base weights
    return adapters.sync_engine(engine, cfg.adapter, folder, rank, push_base)


def make_optimizer(cfg: PGConfig, trainable: list[torch.nn.Parameter]):
    """AdamW and its learning-rate schedule over `steps` rollout steps. fused: one kernel over
    all parameters (0.09 s vs 0.35 s a step for SmolLM2 on 2 CPU cores)."""
    optim = cfg.optim
    optimizer = torch.optim.AdamW(
        trainable, lr=optim.lr, weight_decay=optim.weight_decay, fused=True
    )
    schedule = {"constant": "constant_with_warmup"}.get(optim.schedule, optim.schedule)
    return optimizer, get_scheduler(schedule, optimizer, optim.warmup_steps, cfg.steps)


def sync_weights(engine, policy, accelerator) -> None:
    """Push the policy's weights into the rollout engine as one update (under ZeRO-3 gathered a
    chunk at a time; every rank takes part). Rollout servers are shared by all ranks, and rank 0
    alone syncs them: the others wait for it before they sample again. adapter.sync=adapter: each
    rank saves the adapter as a new version its engine serves from now on."""
    if isinstance(engine, adapters.AdapterSyncEngine):
        engine.sync(policy)
    else:
        with engine.weight_update():
            for chunk in sharding.weight_chunks(policy, export_weights):
                engine.update_weights(chunk)
    accelerator.wait_for_everyone()


def gather_rewards(scores, completions, g: int) -> dict:
    """Every rank's rewards, [P, G] totals, [P, G, K] per function and [P, G] completion lengths,
    in rank order (the step's prompt order)."""
    p_local = len(completions) // g
    lengths = [max(len(c.token_ids), 1) for c in completions]
    local = {
        "total": torch.tensor(scores.total, dtype=torch.float32).view(p_local, g),
        "per_fn": torch.tensor(scores.per_function, dtype=torch.float32).view(p_local, g, -1),
        "length": torch.tensor(lengths, dtype=torch.float32).view(p_local, g),
    }
    return {k: distributed.gather(v) for k, v in local.items()}


def mini_batch_parts(keep: torch.Tensor, mini_batches: int) -> torch.Tensor:
    """[P] the mini-batch of each group of the whole step, -1 for dropped ones: the kept groups are
    dealt round-robin into min(mini_batches, kept) parts, so every part has a group on some rank."""
    parts = torch.full(keep.shape, -1, dtype=torch.long)
    kept = keep.nonzero()[:, 0]
    parts[kept] = torch.arange(len(kept)) % min(mini_batches, len(kept))
    return parts


def local_mini_batches(
    cfg: PGConfig, completions, parts, advantages, pad_id: int, num_parts: int
) -> list[MiniBatch]:
    """This rank's groups of each of the step's `num_parts` mini-batches (`parts` [p_local] from
    mini_batch_parts). DDP needs a backward pass on every rank, so a rank with no group in a
    mini-batch trains on a stand-in group at loss weight 0."""
    g, out = cfg.rollout.num_samples, []
    for part in range(num_parts):
        groups = (parts == part).nonzero()[:, 0].tolist()
        stand_in = not groups
        chosen = [c for i in (groups or [0]) for c in completions[i * g : (i + 1) * g]]
        weights = torch.full((len(chosen),), 0.0 if stand_in else 1.0)
        if cfg.algo.mask_truncated_completions:
            weights *= torch.tensor(
                [c.finish_reason != "length" for c in chosen], dtype=torch.float
            )
        adv = advantages[groups or [0]].reshape(-1)
        out.append(MiniBatch(build_batch(chosen, pad_id, g), adv, weights))
    return out


def objective_backward(
    cfg, accelerator, model, ref_model, completions, mine, pad_id, advantages, keep
) -> None:
    """The gradient method's pass for one objective: the loop's own loss (train_on_batch) on the
    step's groups `keep` [P] as one mini-batch, with that objective's `advantages` [P, G]. Leaves
    the gradient in .grad (under DDP all-reduced: the whole batch's, on every rank)."""
    parts = mini_batch_parts(keep, 1)  # [P]
    (mini,) = local_mini_batches(cfg, completions, parts[mine], advantages[mine], pad_id, 1)
    model.zero_grad(set_to_none=True)
    train_on_batch(cfg, accelerator, model, ref_model, mini, 0)


def update_policy(
    cfg, accelerator, model, ref_model, optimizer, trainable, batches, matmul_params: int
) -> list[dict]:
    """`algo.ppo_epochs` passes over the step's mini-batches, one optimizer step per mini-batch.
    With more than one update, the old logprobs are taken once, before the first. Returns each
    update's stats (stops after a non-finite loss, leaving its gradients for the caller)."""
    old_pass_flops = 0.0
    if cfg.algo.ppo_epochs * len(batches) > 1:
        for mb in batches:
            mb.old_logprobs = policy_logprobs(cfg, accelerator, model, mb.batch)
            old_pass_flops += 2 * matmul_params * real_tokens(mb.batch)
    updates = []
    for _ in range(cfg.algo.ppo_epochs):
        for mb in batches:
            if not loss_tokens(mb):  # every sequence masked on every rank: AdamW's momentum
                continue  # and weight decay would still move the weights, so no step at all
            t0 = time.perf_counter()
            stats = train_on_batch(cfg, accelerator, model, ref_model, mb, matmul_params)
            stats = reduce_stats(stats, EXTREMES_MAX, EXTREMES_MIN)
            if not math.isfinite(stats["loss"]):
                return updates + [stats]
            max_norm = cfg.optim.max_grad_norm
            norm = sharding.optimizer_step(accelerator, model, optimizer, trainable, max_norm)
            if max_norm > 0:
                stats["grad_norm"] = norm
            stats["seconds"] = time.perf_counter() - t0
            updates.append(stats)
    if updates:
        updates[0]["flops"] += old_pass_flops
    return updates


def loss_tokens(mini: MiniBatch) -> float:
    """The tokens that carry loss in this mini-batch, over all ranks (the same on every rank)."""
    local = (mini.batch.completion_mask * mini.weights[:, None]).sum()
    return float(distributed.reduce(local.reshape(1), "sum"))


def real_tokens(batch: RolloutBatch) -> float:
    """Prompt tokens (run once per group) and completion tokens, padding excluded."""
    return float(batch.prompt_mask.sum() + batch.completion_mask.sum())


@torch.no_grad()
def policy_logprobs(cfg: PGConfig, accelerator, model, batch: RolloutBatch) -> torch.Tensor:
    """[B, T] the current policy's logprobs of the completions (the "old" policy of PPO)."""
    g, rows = batch.group_size, []
    per_micro = max(1, cfg.micro_batch_size // g)
    temperature = max(cfg.rollout.temperature, 1e-6)
    bf16 = autocast_enabled(cfg.bf16_autocast)
    autocast = torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16)
    starts = range(0, batch.num_groups, per_micro)
    for i in range(sharding.forward_passes(accelerator, len(starts))):
        start = starts[i] if i < len(starts) else 0  # past this rank's own: a repeat, dropped
        mb = batch.groups(start, start + per_micro).to(accelerator.device)
        with autocast:
            logits = completion_logits(model, mb)
        if i < len(starts):
            rows.append(pg.token_logprobs(logits, mb.completion_ids, temperature).cpu())
    return torch.cat(rows)


def train_on_batch(
    cfg: PGConfig, accelerator, model, ref_model, mini: MiniBatch, matmul_params: int
) -> dict:
    """Micro-batched backward pass of the clipped policy loss over one mini-batch.

    The loss is the whole mini-batch's over all ranks: every rank divides by the global sequence
    and token counts, and multiplies by the number of ranks because DDP averages the gradients.
    """
    batch, g, algo = mini.batch, mini.batch.group_size, cfg.algo
    world = accelerator.num_processes
    loss_mask = batch.completion_mask * mini.weights[:, None]  # [B, T]
    counts = distributed.reduce(
        torch.tensor([float((mini.weights > 0).sum()), float(loss_mask.sum())]), "sum"
    )
    num_sequences, num_tokens = float(counts[0]), max(float(counts[1]), 1.0)
    extremes = {k: 0.0 for k in EXTREMES_MAX} | {k: math.inf for k in EXTREMES_MIN}
    stats = {k: 0.0 for k in STAT_SUMS} | extremes
    temperature = max(cfg.rollout.temperature, 1e-6)
    bf16 = autocast_enabled(cfg.bf16_autocast)
    autocast = torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16)
    tis = algo.tis_cap > 0 and cfg.rollout.backend == "vllm"
    per_micro = max(1, cfg.micro_batch_size // g)  # whole groups: each prompt is run once
    starts = range(0, batch.num_groups, per_micro)
    passes = sharding.forward_passes(accelerator, len(starts))
    for i in range(passes):
        padding = i >= len(starts)  # past this rank's micro-batches: a repeat at loss weight 0
        start = 0 if padding else starts[i]
        mb = batch.groups(start, start + per_micro).to(accelerator.device)
        rows = slice(start * g, (start + per_micro) * g)
        adv = mini.advantages[rows].to(accelerator.device)
        mask = loss_mask[rows].to(accelerator.device) * float(not padding)
        last = i == passes - 1
        with sharding.micro_batch(accelerator, model, last):
            with autocast:
                logits = completion_logits(model, mb)  # [b, T, V]
            logp = pg.token_logprobs(logits, mb.completion_ids, temperature)  # [b, T]
            # one update per rollout batch: the old policy is the current one (ratio exactly 1)
            old = logp.detach() if mini.old_logprobs is None else mini.old_logprobs[rows].to(logp)
            per_token, low, high = pg.clipped_policy_loss(
                logp, old, adv, mask, algo.eps_low, algo.eps_high, algo.importance_level
            )
            if tis:
                weights = pg.importance_weights(
                    old, mb.sampler_logprobs, mask, algo.tis_mode, algo.tis_cap, algo.tis_min
                )
                per_token = per_token * weights
                real = weights.expand_as(mask)[mask > 0]
                if real.numel():
                    stats["tis_sum"] += float(real.sum())
                    stats["tis_zero"] += float((real == 0).sum())
                    stats["tis_min"] = min(stats["tis_min"], float(real.min()))
                    stats["tis_max"] = max(stats["tis_max"], float(real.max()))
            if ref_model is not None:
                with torch.no_grad(), autocast:
                    ref_logits = completion_logits(ref_model, mb)
                kl = pg.k3_kl(logp, pg.token_logprobs(ref_logits, mb.completion_ids, temperature))
                per_token = per_token + algo.kl_beta * kl
                stats["kl"] += float((kl.detach() * mask).sum())
            # this micro-batch's share of the mini-batch's loss: divisors of the whole mini-batch
            loss = pg.aggregate_loss(
                per_token,
                mask,
                algo.loss_aggregation,
                max_completion_length=cfg.rollout.max_new_tokens,
                num_sequences=num_sequences,
                num_tokens=num_tokens,
            )
            # AdaLoRA's orthogonality penalty, once per update: each rank adds 1/(its micro-batches
            # x world) of it per micro-batch, so DDP's average of the sums is its gradient
            penalty = adapters.extra_loss(model) / (passes * world)
            accelerator.backward((loss + penalty) * world)
        if padding:
            continue
        gap = (old - mb.sampler_logprobs).abs() * mask  # stale-weights alarm
        stats["loss"] += float(loss.detach())
        stats["clip_low"] += float((low * mask).sum())
        stats["clip_high"] += float((high * mask).sum())
        stats["ratio_dev_max"] = max(
            stats["ratio_dev_max"], float(((logp.detach() - old).exp() - 1).abs().mul(mask).max())
        )
        stats["entropy"] += float((pg.token_entropy(logits.detach(), temperature) * mask).sum())
        stats["gap_sum"] += float(gap.sum())
        stats["gap_max"] = max(stats["gap_max"], float(gap.max()))
        stats["tokens"] += float(mask.sum())
        # forward + backward over every real prompt and completion token: 6 x params each,
        # plus 2 x params for the reference model's forward
        stats["flops"] += (6 + 2 * (ref_model is not None)) * matmul_params * real_tokens(mb)
    stats["peak_rss_gib"] = peak_rss_gib()  # this process's peak so far (the last sync included)
    stats["peak_gpu_gib"] = peak_gpu_gib()  # 0 on CPU
    return stats


def merge_updates(updates: list[dict]) -> dict:
    """One step's stats from its updates: sums add up, extremes take the max / min, the loss and
    the gradient norm are the mean over updates."""
    means = ("loss", "grad_norm")
    return {"updates": len(updates)} | combine_stats(updates, EXTREMES_MAX, EXTREMES_MIN, means)


def step_metrics(step, full, keep, advantages, reward_fns, stats, times, step_time, lr) -> dict:
    """One metrics.jsonl row."""
    total, per_fn, length = full["total"], full["per_fn"], full["length"]
    row = {
        "step": step,
        "reward_mean": float(total.nanmean()),
        "reward_std": float(np.nanstd(total.numpy())),
    }
    for k, fn in enumerate(reward_fns):
        row[f"reward/{fn.name}"] = float(per_fn[..., k].nanmean())
    row |= {
        "advantage_mean": float(advantages.mean()),
        "advantage_std": float(advantages.std()),
        "advantage_abs_max": float(advantages.abs().max()),
        "groups_kept": int(keep.sum()),
        "groups_total": int(keep.numel()),
        "completion_tokens_mean": float(length.mean()),
        "lr": lr,
        "step_time_s": step_time,
        "tokens_per_s": float(length.sum()) / step_time,
    }
    row |= {f"time_{k}_s": v for k, v in times.items()}
    if stats is None:
        return row | {
            "loss": math.nan,
            "logprob_gap_max": math.nan,
            "skipped": "no group with signal",
        }
    tokens = max(stats["tokens"], 1.0)
    row |= {
        "loss": stats["loss"],
        "updates": stats["updates"],
        "clip_low_fraction": stats["clip_low"] / tokens,
        "clip_high_fraction": stats["clip_high"] / tokens,
        "ratio_dev_max": stats["ratio_dev_max"],
        "entropy": stats["entropy"] / tokens,
        "kl": stats["kl"] / tokens,
        "logprob_gap_max": stats["gap_max"],
        "logprob_gap_mean": stats["gap_sum"] / tokens,
        "grad_norm": stats.get("grad_norm", math.nan),
        "train_flops_per_s": stats["flops"] / times["train"],
        "peak_rss_gib": stats["peak_rss_gib"],
    }
    if stats["peak_gpu_gib"] > 0:
        row["peak_gpu_gib"] = stats["peak_gpu_gib"]
    if stats["tis_max"] > 0:
        row |= {
            "tis_mean": stats["tis_sum"] / tokens,
            "tis_min": stats["tis_min"],
            "tis_max": stats["tis_max"],
            "tis_zero_fraction": stats["tis_zero"] / tokens,
        }
    return row


if __name__ == "__main__":
    sys.exit(main())

"""Policy-gradient training: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE(++) in one loop.

    accelerate launch recipes/pg.py --config recipes/grpo.yaml [key.sub=value ...]
    python recipes/pg.py --config recipes/grpo.yaml              # one process, same thing

Each step: sample `rollout.num_samples` completions for `prompts_per_step` training prompts on the
rollout engine (vLLM by default) -> score them -> group advantages over the kept groups ->
`algo.ppo_epochs` passes over `algo.mini_batches` mini-batches, one clipped policy-gradient update
(micro-batched) each -> push the new weights into the engine. The math lives in rlx/algos/pg.py;
the learner is chosen by `algo.*` (recipes/grpo.yaml, rloo.yaml, reinforce.yaml).
With rollout.async=true a producer thread samples the next steps' prompts while the learner
trains, at most rollout.max_staleness weight versions behind (rlx/rollout_source.py).

By default one optimizer step per rollout batch (ppo_epochs = mini_batches = 1): the trainer's
logprobs at update time are the "old" ones, so the clipped ratio is 1 and only importance sampling
(`algo.tis_*`) corrects the vLLM/trainer mismatch. With more updates per batch the old logprobs
are taken once, before the first, and the clip bounds act. The KL term (off by default) is added
to the loss, not folded into the reward.

Several processes: each rank generates and scores its share of the step's prompts; rewards are
gathered (rlx/distributed.py, the only place ranks exchange data) so advantages, REINFORCE's
global whitening and dynamic sampling see the whole batch, and every skip or stop is agreed by
all ranks before any acts. Under DeepSpeed every rank runs as many micro-batch passes as the
busiest one (the extra ones at loss weight 0): ZeRO-3's forwards gather the parameters, ZeRO-2's
backwards reduce gradients, and each loss is agreed finite before its backward (rlx/sharding.py).
Each rank divides its loss by the whole mini-batch's sequence and token counts (gathered) and
multiplies it by the number of ranks, so that DDP's gradient average is the gradient of the batch
loss one process would compute (TRL does this for loss_type "dapo" only).
What is trained is the `adapter:` section's (docs/adapters.md): all weights or a PEFT adapter, the
principal guard and AdaLoRA's allocation as optimizer step hooks, AdaLoRA's orthogonality penalty
in the loss, the spectral probe's diag/* metrics, and merged or adapter-only weight sync. Dynamic
reward weighting and the adapter's hooks plug into the step's named points (rlx/features.py).
Outputs in `output_dir`: metrics.jsonl, eval.json, reward_curves.png,
config.yaml, checkpoints/, tensorboard logs.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from transformers import get_scheduler

from rlx import adapters, distributed, sharding
from rlx.algos import pg
from rlx.batch import MiniBatch, RolloutBatch, build_batch
from rlx.config import AdapterConfig, ConfigError, PGConfig
from rlx.features import Feature, Features
from rlx.hardware import autocast_enabled, describe_choice
from rlx.metrics import Stats, peak_gpu_gib, peak_rss_gib
from rlx.policy import completion_logits, load_policy, matmul_params
from rlx.recipe import Run, StepClock, load_data, run_recipe
from rlx.rollout import engine_dtype, make_engine
from rlx.rollout_source import AsyncRollouts, SyncRollouts
from rlx.weight_sync import weight_sync
from rlx.weighting import start_weighting

# One update's statistics: sums over micro-batches and ranks, except these (rlx.metrics.Stats)
MAXIMA = ("gap_max", "tis_max", "ratio_dev_max", "peak_rss_gib", "peak_gpu_gib")
MINIMA = ("tis_min",)
SUMS = ("loss", "clip_low", "clip_high", "entropy", "kl", "gap_sum", "tis_sum", "tis_zero")
SUMS += ("tokens", "flops")


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PGConfig, train, argv, __doc__, "pg")


def train(cfg: PGConfig) -> dict:
    """Run the loop; return eval.json's content. Each step: rollouts -> rewards -> advantages ->
    update -> sync -> log and checkpoint; research features plug in at named points (Feature)."""
    run = Run(cfg, nan_on_skip=("loss", "logprob_gap_max"))
    announce(cfg, run)
    trainer = Trainer(cfg, run)
    train_data, eval_data, reward_fns = load_data(cfg, trainer.tokenizer)
    weights = make_weight_sync(cfg, run.rank, run.run_id)
    engine = weights.engine
    if run.resume(*trainer.checkpointed()) or cfg.rollout.backend == "server":
        trainer.sync(weights, run.step)  # a server may hold another run's weights
    source = AsyncRollouts if cfg.rollout.async_ else SyncRollouts  # rlx/rollout_source.py
    rollouts = source(cfg, engine, train_data, run.rank, run.world)
    features = start_features(cfg, run, trainer, rollouts.engine, eval_data, reward_fns)
    rollouts.resync = lambda: trainer.sync(weights, run.step, full=True)  # a restarted server
    run.start(engine, eval_data, reward_fns)

    while run.step < cfg.steps:
        clock = StepClock()
        rows, completions = rollouts.next(run.step)
        clock.lap("rollout")
        scores = run.score(rows, completions, reward_fns)  # None: skipped on every rank
        if scores is None:
            continue
        clock.lap("reward")
        step = score_step(cfg, trainer, run, scores, completions, reward_fns, features)
        stats = trainer.update(step, run.step) if step.keep.any() else None
        if stats is not None and not math.isfinite(stats["loss"]):  # the same on every rank
            if cfg.bad_steps == "error":
                raise FloatingPointError(
                    f"step {run.step + 1}: the loss is not finite; lower optim.lr or set "
                    "bad_steps=skip"
                )
            run.skip("non-finite loss")
            continue
        clock.lap("train")
        if stats is not None and (run.step + 1) % cfg.sync_every == 0:
            with rollouts.syncing():  # async: no generation meanwhile; counts the version
                trainer.sync(weights, run.step + 1)
        clock.lap("sync")
        run.step += 1
        extra = features.after_step(run.step)  # on every rank: some features evaluate
        extra = extra | rollouts.metrics()  # on every rank: async/* (sums over ranks)
        if run.main:
            lr = trainer.scheduler.get_last_lr()[0]
            row = step_metrics(run.step, step, reward_fns, stats, clock, lr) | extra
            run.log_step(row, reward=row["reward_mean"], gap=row["logprob_gap_max"])
        state = (*trainer.checkpointed(), features.state(), features.tensors)
        if run.end_step(clock.total(), *state):
            break

    rollouts.close()  # the producer's queued batches are not checkpointed (rlx/rollout_source.py)
    title = f"{cfg.model.name} on {cfg.task.name} ({cfg.eval.split}, greedy)"
    results = run.finish(trainer.policy, trainer.tokenizer, engine, eval_data, reward_fns, title)
    engine.close()
    run.close()
    return results


# ----------------------------------------------------------------------------- the stages


class Trainer:
    """The learner's side of the loop: the policy (all weights or an adapter, under DDP or
    DeepSpeed), the KL term's reference model, AdamW and its schedule, and the adapter's
    optimizer-step hooks (installed before a resume: the principal guard keeps the initial
    weights' directions)."""

    def __init__(self, cfg: PGConfig, run: Run):
        accelerator = self.accelerator = run.accelerator
        self.cfg, self.updates_per_step = cfg, cfg.algo.ppo_epochs * cfg.algo.mini_batches
        self.updates = 0  # optimizer updates applied so far (checkpointed: UpdateCount)
        total = cfg.steps * self.updates_per_step
        model, self.tokenizer = load_policy(cfg.model, cfg.adapter, total_steps=total)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.forward_params = matmul_params(model)  # for the train FLOP/s metric
        optimizer, self.scheduler = make_optimizer(cfg, self.trainable)
        sharding.configure(accelerator, cfg.optim.max_grad_norm, cfg.adapter.enabled)
        adapters.check_probe_sharding(cfg.adapter, sharding.zero_stage(accelerator))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.policy = accelerator.unwrap_model(self.model)
        self.ref_model = load_reference(cfg, accelerator) if cfg.algo.kl_beta > 0 else None
        self.hooks = adapters.install_step_hooks(self.policy, self.optimizer, cfg.adapter)
        self.probe = adapters.make_probe(self.policy, cfg.adapter)
        print(f"pg: rank {run.rank}: {sharding.describe(accelerator, self.policy)}")

    def checkpointed(self) -> tuple:
        """(model, optimizer, scheduler) as checkpoints save them (DeepSpeed: its engine's shards)."""
        saved = self.model if sharding.zero_stage(self.accelerator) else self.policy
        return saved, self.optimizer, self.scheduler

    def update(self, step: ScoredStep, index: int) -> Stats | None:
        """`algo.ppo_epochs` passes over the step's mini-batches of kept groups, one optimizer step
        each; the step's statistics over all ranks (None when every loss token was masked).
        `index`: the rollout step's (0-based); its updates take AdaLoRA's allocation steps from
        index x updates_per_step + 1 on, so its budget follows the rollout steps (StepHooks).

        A step whose loss or gradient is not finite leaves nothing behind for bad_steps=skip: the
        check comes before each optimizer step (under DeepSpeed the loss's before each backward
        too, and the engine steps only after the check: rlx/sharding.py), the failed update's
        gradients are dropped, and the updates the step had already applied (more than one per
        step) are undone from a copy taken before it (`snapshot`). DeepSpeed's partitioned
        optimizer state has no such copy: there the step keeps the updates it applied before the
        failed one, drops that one and the rest, and counts as trained (`dropped_updates` in its
        metrics), so that the loop syncs what was applied into the rollout engine, as DeepSpeed
        itself does with an fp16 overflow."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        parts = mini_batch_parts(step.keep, cfg.algo.mini_batches)  # [P]
        num_parts, mine = int(parts.max()) + 1, step.mine
        adv = step.advantages[mine]
        batches = local_mini_batches(cfg, step.completions, parts[mine], adv, pad, num_parts)
        args = (self.accelerator, self.model, self.ref_model, self.optimizer, self.trainable)
        self.hooks.start(index * self.updates_per_step)
        before = self.snapshot()
        updates = update_policy(cfg, *args, batches, self.forward_params)
        if not updates:
            return None
        failed = None if math.isfinite(updates[-1]["loss"]) else updates.pop()  # applied nothing
        zero = sharding.zero_stage(self.accelerator)
        if failed is not None and not (updates and cfg.bad_steps == "skip" and zero):
            if before is not None:  # undo the updates the step applied before the failed one
                self.restore(before)
            return merge_updates([*updates, failed])  # a NaN loss: the caller stops or skips
        stats = merge_updates(updates)
        if failed is not None:  # DeepSpeed: the applied updates are kept, and the loop syncs them
            stats.add({"dropped_updates": failed["dropped_updates"], "flops": failed["flops"]})
            if self.accelerator.is_main_process:
                print(
                    f"pg: step {index + 1}: an update's loss or gradient is not finite after "
                    f"{len(updates)} update(s) that DeepSpeed applied; they are kept, the rest "
                    "of the step is dropped"
                )
        self.updates += len(updates)
        return stats

    def snapshot(self) -> dict | None:
        """A copy of what the step's optimizer updates change (the trainable weights, AdamW's
        state, the adapter hooks' count and AdaLoRA's allocator), taken when bad_steps=skip may
        have to undo updates: more than one per step, outside DeepSpeed (whose partitioned
        optimizer state has no such copy; update() keeps what was applied there instead). It costs
        three copies of the trainable weights while the step runs."""
        zero = sharding.zero_stage(self.accelerator)
        if self.cfg.bad_steps != "skip" or self.updates_per_step == 1 or zero:
            return None
        state = self.inner_optimizer().state
        copies = {
            p: {k: v.clone() if torch.is_tensor(v) else v for k, v in state[p].items()}
            for p in self.trainable
            if p in state
        }
        weights = [p.detach().clone() for p in self.trainable]
        return {"weights": weights, "state": copies, "hooks": self.hooks.snapshot()}

    @torch.no_grad()
    def restore(self, snapshot: dict) -> None:
        """Undo the updates since `snapshot` (the same on every rank: they trained alike)."""
        for p, saved in zip(self.trainable, snapshot["weights"], strict=True):
            p.copy_(saved)
        state = self.inner_optimizer().state
        for p in self.trainable:
            state.pop(p, None)
        state.update(snapshot["state"])
        self.hooks.restore(snapshot["hooks"])

    def inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def learning_rate(self, step: int) -> float:
        """The learning rate of rollout step `step` (0-based), the scheduler moved there first.
        The schedule counts rollout steps, skipped ones included, so that it ends at `steps`
        however many were skipped; per rollout step rather than per optimizer update, because
        the updates of a step vary (dropped mini-batches, fewer kept groups than mini-batches,
        skips) and their total is not known when the schedule is sized. A resume restores the
        scheduler and continues from there."""
        with warnings.catch_warnings():  # stepping before any optimizer step (a skipped step 1)
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            while self.scheduler.last_epoch < step:
                self.scheduler.step()
        return self.scheduler.get_last_lr()[0]

    def sync(self, weights, version: int, full: bool = False) -> None:
        """Push the policy into the rollout engine (`weights`: the rlx.weight_sync strategy) as
        weight version `version` (the steps trained); `full`: everything again, for a restarted
        rollout server (the adapter's base too). Every rank takes part (ZeRO-3 gathers
        collectively); rollout servers are shared by all ranks and rank 0 alone sends to them,
        so the others wait for it before they sample again."""
        weights.push(self.policy, version, full)
        self.accelerator.wait_for_everyone()

    def objective_backward(self, step: ScoredStep):
        """The gradient-weighting method's backward pass on `step`'s completions (see
        objective_backward)."""
        pad = self.tokenizer.pad_token_id
        args = (self.accelerator, self.model, self.ref_model, step.completions, step.mine, pad)
        return partial(objective_backward, self.cfg, *args)


class ScoredStep:
    """One step's record from its rewards on: this rank's completions and its slice `mine` of the
    step's prompts, every rank's rewards (`full`: [P, G] total, [P, G, K] per function, [P, G]
    lengths), the rewards' weights, then the advantages [P, G] and kept groups [P]. `backward`
    and `lr` serve the gradient-weighting feature. (A plain class: tests load this script by path,
    where dataclasses cannot resolve its annotations.)"""

    def __init__(self, completions: list, mine: slice, full: dict, weights: list[float]):
        self.completions, self.mine, self.full, self.weights = completions, mine, full, weights
        self.backward: Callable | None = None
        self.lr = 0.0
        self.advantages: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None


def score_step(cfg, trainer, run, scores, completions, reward_fns, features) -> ScoredStep:
    """Every rank's rewards -> the step's weights (features may change both) -> advantages over
    the kept groups (features may scale them)."""
    full = gather_rewards(scores, completions, cfg.rollout.num_samples)
    p_local = len(completions) // cfg.rollout.num_samples
    mine = slice(run.rank * p_local, (run.rank + 1) * p_local)
    step = ScoredStep(completions, mine, full, [fn.weight for fn in reward_fns])
    step.lr = trainer.learning_rate(run.step)
    step.backward = trainer.objective_backward(step)
    features.after_rewards(step)
    algo = cfg.algo
    step.advantages, step.keep = pg.kept_advantages(
        algo.learner,
        step.full["total"],
        step.full["per_fn"],
        step.full["length"],
        step.weights,
        algo.reward_normalization,
        algo.dynamic_sampling,
        scale_rewards=algo.scale_rewards,
    )
    features.after_advantages(step)
    return step


def start_features(cfg, run, trainer, engine, eval_data, reward_fns) -> Features:
    """The research features of this run, after the resume: the adapter's (hook time, AdaLoRA's
    allocator state, spectral diagnostics) and dynamic reward weighting (None: static). The
    optimizer updates counted so far come from the checkpoint (a checkpoint without the count,
    from before it was kept, assumes every step made ppo_epochs x mini_batches of them); AdaLoRA's
    allocation step comes with its allocator state (older checkpoints: the updates counted, the
    step they were allocated at)."""
    assumed = run.step * trainer.updates_per_step
    trainer.updates = int(run.resumed_state.get(UpdateCount.KEY, assumed))
    trainer.hooks.resume(trainer.updates, run.resumed_tensors)  # AdaLoRA's budget schedule
    every = cfg.adapter.diagnostics_every
    adapter = adapters.AdapterFeature(trainer.hooks, trainer.probe, trainer.policy, every, run.main)
    policy, optimizer = trainer.policy, trainer.optimizer  # the meta-reward scales its lr
    weighting = start_weighting(cfg, run, engine, eval_data, reward_fns, policy, optimizer)
    return Features([UpdateCount(trainer), adapter, weighting])


class UpdateCount(Feature):
    """The optimizer updates applied so far (Trainer.updates) in every checkpoint's state.json: a
    step makes fewer than ppo_epochs x mini_batches when mini-batches are dropped or fewer groups
    are kept, and none when skipped, so a resume cannot compute it. (AdaLoRA's allocation step,
    which follows the rollout steps, is checkpointed with its allocator; this count stands in for
    it with checkpoints written before it was.)"""

    KEY = "optimizer_updates"

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state(self) -> dict:
        return {self.KEY: self.trainer.updates}


# ----------------------------------------------------------------------------- the step's pieces


def announce(cfg: PGConfig, run: Run) -> None:
    """Check the process count against the batch and print what this run does."""
    if cfg.prompts_per_step % run.world:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {run.world} "
            "processes"
        )
    if run.main:
        device, learner = run.accelerator.device, cfg.algo.learner
        links = f", collectives over {distributed.backend()}" if distributed.active() else ""
        print(f"pg: {run.world} process(es) on {device}{links}, learner {learner}")
        trainer = "bfloat16 autocast" if autocast_enabled(cfg.bf16_autocast) else "float32"
        print(describe_choice(engine=engine_dtype(cfg.rollout), trainer=trainer))


def load_reference(cfg: PGConfig, accelerator):
    """The frozen reference model of the KL term: the initial policy, without an adapter, on the
    trainer's device (under ZeRO-3 sharded like the policy, rlx.sharding.prepare_frozen)."""
    ref_model, _ = load_policy(cfg.model, AdapterConfig())
    return sharding.prepare_frozen(accelerator, ref_model.eval().requires_grad_(False))


def make_weight_sync(cfg: PGConfig, rank: int, run_id: str | None = None):
    """The rollout engine inside its weight-sync strategy (rlx.weight_sync: merged weights, or
    with adapter.sync=adapter the adapter alone, versions saved under output_dir/adapter_sync).
    Rollout servers label the weights with `run_id` (rlx.recipe.Run.run_id)."""
    engine = make_engine(cfg.rollout.backend, cfg.model.name, cfg.rollout, rank, run_id)
    folder = f"{cfg.output_dir}/adapter_sync"
    push_base = cfg.rollout.backend == "server"  # a server may hold another run's base weights
    return weight_sync(engine, cfg.adapter, folder, rank, push_base)


def make_optimizer(cfg: PGConfig, trainable: list[torch.nn.Parameter]):
    """AdamW and its learning-rate schedule over `steps` rollout steps. fused: one kernel over
    all parameters (0.09 s vs 0.35 s a step for SmolLM2 on 2 CPU cores)."""
    optim = cfg.optim
    optimizer = torch.optim.AdamW(
        trainable, lr=optim.lr, weight_decay=optim.weight_decay, fused=True
    )
    schedule = {"constant": "constant_with_warmup"}.get(optim.schedule, optim.schedule)
    return optimizer, get_scheduler(schedule, optimizer, optim.warmup_steps, cfg.steps)


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
) -> list[Stats]:
    """`algo.ppo_epochs` passes over the step's mini-batches, one optimizer step per mini-batch.
    With more than one update, the old logprobs are taken once, before the first. Returns each
    update's stats over all ranks; it stops at an update whose loss or gradient is not finite on
    some rank, before its optimizer step and with its gradients dropped, so that nothing of it is
    applied (that update's stats come last, with a NaN loss and the count of updates dropped:
    it and the ones after it)."""
    # a mini-batch whose every token is masked on every rank takes no step at all (AdamW's
    # momentum and weight decay would still move the weights); decided once, the same on all ranks
    batches = [mb for mb in batches if loss_tokens(mb)]
    old_pass_flops = 0.0
    if cfg.algo.ppo_epochs * len(batches) > 1:
        for mb in batches:
            mb.old_logprobs = policy_logprobs(cfg, accelerator, model, mb.batch)
            old_pass_flops += 2 * matmul_params * real_tokens(mb.batch)
    planned = [mb for _ in range(cfg.algo.ppo_epochs) for mb in batches]
    updates = []
    for done, mb in enumerate(planned):
        t0 = time.perf_counter()
        stats = train_on_batch(cfg, accelerator, model, ref_model, mb, matmul_params)
        stats = stats.over_ranks()  # the same loss on every rank
        max_norm, norm = cfg.optim.max_grad_norm, None
        if math.isfinite(stats["loss"]):
            norm = sharding.optimizer_step(accelerator, model, optimizer, trainable, max_norm)
        else:  # nothing of this update is applied: drop what its backward passes left
            sharding.drop_gradients(accelerator, model, optimizer)
        if norm is None:  # no step was taken (a non-finite gradient: the loss says so too)
            stats.values["loss"] = math.nan
            stats.add({"dropped_updates": len(planned) - done})  # this one and the rest
            updates.append(stats)
            break
        if max_norm > 0:
            stats.add({"grad_norm": norm})
        stats.add({"seconds": time.perf_counter() - t0, "updates": 1})
        updates.append(stats)
    if updates:
        updates[0].add({"flops": old_pass_flops})
    return updates


def merge_updates(updates: list[Stats]) -> Stats:
    """One step's stats from its updates (sums add up, extremes take the max / min; the loss and
    the gradient norm are summed too: step_metrics divides them by the number of updates)."""
    step = Stats(SUMS, MAXIMA, MINIMA)
    for update in updates:
        step.add(update.values)
    return step


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
) -> Stats:
    """Micro-batched backward pass of rlx.algos.pg.policy_loss over one mini-batch; this rank's
    stats.

    The loss is the whole mini-batch's over all ranks: every rank divides by the global sequence
    and token counts, and multiplies by the number of ranks because DDP averages the gradients.
    Under DeepSpeed every rank runs as many passes as the busiest (extra ones at loss weight 0),
    and the passes stop, on every rank, at a loss that is not finite on some rank (its backward is
    not run; the stats' loss is then NaN).
    """
    batch, g, algo = mini.batch, mini.batch.group_size, cfg.algo
    world = accelerator.num_processes
    loss_mask = batch.completion_mask * mini.weights[:, None]  # [B, T]
    counts = distributed.reduce(
        torch.tensor([float((mini.weights > 0).sum()), float(loss_mask.sum())]), "sum"
    )
    divisors = pg.LossDivisors(float(counts[0]), float(counts[1]), cfg.rollout.max_new_tokens)
    stats = Stats(SUMS, MAXIMA, MINIMA)
    temperature = max(cfg.rollout.temperature, 1e-6)
    bf16 = autocast_enabled(cfg.bf16_autocast)
    autocast = torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16)
    # every engine returns the sampler's logprobs (with rollout.async: the behaviour policy's)
    tis = algo.tis_cap > 0
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
        old = None if mini.old_logprobs is None else mini.old_logprobs[rows]
        with sharding.micro_batch(accelerator, model, i == passes - 1):
            with autocast:
                logits = completion_logits(model, mb)  # [b, T, V]
            logp = pg.token_logprobs(logits, mb.completion_ids, temperature)  # [b, T]
            ref = None
            if ref_model is not None:
                with torch.no_grad(), autocast:
                    ref_logits = completion_logits(ref_model, mb)
                ref = pg.token_logprobs(ref_logits, mb.completion_ids, temperature)
            sampler = mb.sampler_logprobs if tis else None
            loss, loss_stats = pg.policy_loss(logp, old, sampler, ref, adv, mask, algo, divisors)
            # AdaLoRA's orthogonality penalty, once per update: each rank adds 1/(its passes x
            # world) of it per pass, so DDP's average of the sums is its gradient
            penalty = adapters.extra_loss(model) / (passes * world)
            if not sharding.backward(accelerator, model, (loss + penalty) * world):
                stats.add({"loss": math.nan})  # not finite on some rank: the update stops here
                break
        if padding:
            continue
        old = logp.detach() if old is None else old.to(logp)
        gap = (old - mb.sampler_logprobs).abs() * mask  # stale-weights alarm
        stats.add(loss_stats)
        stats.add(
            {
                "loss": float(loss.detach()),
                "entropy": float((pg.token_entropy(logits.detach(), temperature) * mask).sum()),
                "gap_sum": float(gap.sum()),
                "gap_max": float(gap.max()),
                "tokens": float(mask.sum()),
                # forward + backward over every real prompt and completion token: 6 x params
                # each, plus 2 x params for the reference model's forward
                "flops": (6 + 2 * (ref_model is not None)) * matmul_params * real_tokens(mb),
            }
        )
    # this process's peak memory so far (the last sync included); 0 GPU memory on CPU
    return stats.add({"peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu_gib()})


def step_metrics(step: int, scored, reward_fns, stats: Stats | None, clock, lr: float) -> dict:
    """One metrics.jsonl row: rewards, advantages and kept groups of `scored` (ScoredStep), the
    update's statistics, the stages' times."""
    full, advantages, keep = scored.full, scored.advantages, scored.keep
    total, per_fn, length = full["total"], full["per_fn"], full["length"]
    step_time = clock.total()
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
    row |= {f"time_{k}_s": v for k, v in clock.seconds.items()}
    if stats is None:
        return row | {
            "loss": math.nan,
            "logprob_gap_max": math.nan,
            "skipped": "no group with signal",
        }
    tokens, updates = max(stats["tokens"], 1.0), stats["updates"]
    row |= {
        "loss": stats["loss"] / updates,
        "updates": int(updates),
        "clip_low_fraction": stats["clip_low"] / tokens,
        "clip_high_fraction": stats["clip_high"] / tokens,
        "ratio_dev_max": stats["ratio_dev_max"],
        "entropy": stats["entropy"] / tokens,
        "kl": stats["kl"] / tokens,
        "logprob_gap_max": stats["gap_max"],
        "logprob_gap_mean": stats["gap_sum"] / tokens,
        "grad_norm": stats.get("grad_norm") / updates,
        "train_flops_per_s": stats["flops"] / clock.seconds["train"],
        "peak_rss_gib": stats["peak_rss_gib"],
    }
    if stats["peak_gpu_gib"] > 0:
        row["peak_gpu_gib"] = stats["peak_gpu_gib"]
    if stats.get("dropped_updates", 0) > 0:  # DeepSpeed kept the step's earlier updates
        row["dropped_updates"] = int(stats["dropped_updates"])
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

"""The training loop's side of dynamic reward weighting (recipes/pg.py); the math is rlx/objectives.py.

    weighting = start_weighting(cfg, run, engine, eval_data, reward_fns, policy, optimizer)

It is a feature of the loop (rlx.features), plugged in at three points of each step:
    after_rewards       full, weights = reweigh(full, backward, lr): this step's total, weights
    after_advantages    the hypervolume meta-reward scales the learning rate of this step's
                        optimizer updates
    after_step          the learning rate back; validation (hypervolume); the metrics
and state() for the checkpoint.

Hypervolume-guided: a validation point every `weighting.hv_every` steps feeds HypervolumeWeighting
(meta-reward, and with `weighting.hv_adapt_weights` the preference weights). The meta-reward m
multiplies the optimizer's learning rate from after_advantages until after_step, so it scales the
parameter change of the step's updates. On the rewards (the reference) GRPO's std division and
REINFORCE's whitening cancel it; on the advantages gradient clipping and Adam's normalisation
absorb it.

Gradient-based: before the real update, one backward pass of the loop's own loss per objective
(`backward`, supplied by the loop) on every group the step trains on (any objective varies), so
each objective's loss has the whole batch's divisors, with that objective's own advantages
(rlx.algos.pg.objective_advantages: its group z-score under normalize_then_sum, 0 in groups
where it is constant). The gradients, restricted to `weighting.grad_layers` after clipping the
whole gradient to `optim.max_grad_norm` (as the reference does), give the influences (with or
without each objective's self-term) and GradientWeighting's mirror-descent step (every
`weighting.grad_accumulation_steps` steps, with the mean influence). Under DDP each pass ends in
the gradient all-reduce, so every rank holds the whole batch's gradient and computes the same
influences.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import torch

from rlx import sharding
from rlx.algos import pg
from rlx.config import ConfigError
from rlx.evaluation import evaluate
from rlx.features import Feature
from rlx.objectives import GradientWeighting, HypervolumeWeighting, check_weights, influences
from rlx.rewards import RewardFunction, load_reward

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
"""The decoder-layer index in a parameter's name (HF's model.layers.N., also under PEFT)."""


def start_weighting(
    cfg, run, engine, eval_data, reward_fns, policy, optimizer=None
) -> DynamicWeighting | None:
    """The run's dynamic weighting, from the checkpoint resumed from or new (the hypervolume
    method evaluates its reference point now, and scales `optimizer`'s learning rate); None for
    static weights. Bad settings raise ConfigError before anything is written."""
    knobs, names = cfg.weighting, [fn.name for fn in reward_fns]
    method = knobs.method
    if method == "static":
        return None
    if len(names) < 2 or (method == "hypervolume" and len(names) > 3):
        wanted = "2 or 3 reward functions" if method == "hypervolume" else "2 or more rewards"
        raise ConfigError(
            f"weighting.method={method} needs {wanted} (objectives to weigh), got "
            f"{len(names)}: {names}"
        )
    try:
        weights = check_weights([fn.weight for fn in reward_fns])
    except ValueError as err:
        raise ConfigError(f"weighting.method={method}: reward {err}") from None
    if method == "gradient":
        if sharding.zero_stage(run.accelerator):
            raise ConfigError(
                "weighting.method=gradient under DeepSpeed ZeRO is not supported (the engine "
                "keeps the gradients in its ZeRO buffers); use launch/cpu_2proc.yaml or one process"
            )
        params = layer_parameters(policy, knobs.grad_layers)
        steps = knobs.grad_accumulation_steps
        grad = GradientWeighting(weights, knobs.grad_lambda, steps)
        weighting = DynamicWeighting(cfg, names, grad)
        weighting.params, weighting.trainable = params, trainable_parameters(policy)
    else:
        if eval_data is None:
            raise ConfigError(
                "weighting.method=hypervolume needs eval.enabled=true (its validation slice)"
            )
        validation = validation_functions(reward_fns, knobs.hv_validation)
        objectives = [fn.name for fn in validation]
        unknown = sorted(set(knobs.hv_minimise) - set(objectives))
        if unknown:
            raise ConfigError(
                f"weighting.hv_minimise: {unknown} are not validation objectives of {objectives}"
            )
        minimise = [name in knobs.hv_minimise for name in objectives]
        fixed = [fn.weight for fn in reward_fns]
        adapt_lr = knobs.hv_adapt_lr if knobs.hv_adapt_weights else 0.0
        hv = HypervolumeWeighting(minimise, weights if adapt_lr else fixed, adapt_lr)
        weighting = DynamicWeighting(cfg, names, hv)
        weighting.validation, weighting.optimizer = validation, optimizer
    weighting.main, weighting.engine, weighting.eval_data = run.main, engine, eval_data
    if cfg.algo.reward_normalization == "sum_then_normalize" and run.main:
        print(
            "weighting: algo.reward_normalization=sum_then_normalize: in a group where one "
            "objective varies the weights do not act; normalize_then_sum lets them act in every "
            "group (docs/multi_objective.md)"
        )
    if "weighting" in run.resumed_state:
        weighting.method.load_state_dict(run.resumed_state["weighting"])
    elif method == "hypervolume":
        weighting.method.start(weighting.validation_point(engine, eval_data))
    return weighting


def validation_functions(reward_fns, replacements: dict[str, str]) -> list[RewardFunction]:
    """The validation objectives: each reward function, or the one `weighting.hv_validation` scores in
    its place (named after its own function, e.g. completion_length for concise)."""
    names = [fn.name for fn in reward_fns]
    unknown = sorted(set(replacements) - set(names))
    if unknown:
        raise ConfigError(f"weighting.hv_validation: {unknown} are not reward functions of {names}")
    out = []
    for fn in reward_fns:
        spec = replacements.get(fn.name)
        if spec is None:
            out.append(fn)
        else:
            loaded = load_reward(spec)
            out.append(RewardFunction(getattr(loaded, "__name__", spec), loaded, 1.0))
    return out


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def layer_parameters(model, layers: list[int]) -> list[torch.nn.Parameter]:
    """The trainable parameters of the chosen decoder layers ([]: the middle half,
    layers L//4 .. L - L//4 - 1 of L). Embeddings, the final norm and the head are left out, as in
    the reference."""
    count = int(model.config.num_hidden_layers)
    chosen = set(layers) if layers else set(range(count // 4, count - count // 4))
    if max(chosen) >= count:
        raise ConfigError(
            f"weighting.grad_layers={sorted(chosen)}: the model has {count} layers (0..{count - 1})"
        )
    params = []
    for name, param in model.named_parameters():
        match = LAYER_INDEX.search(name)
        if param.requires_grad and match and int(match.group(1)) in chosen:
            params.append(param)
    if not params:
        raise ConfigError(f"weighting.grad_layers={sorted(chosen)}: no trainable parameter there")
    return params


def weighted_total(per_fn: torch.Tensor, weights) -> torch.Tensor:
    """[P, G] sum_k w_k r_k of [P, G, K] rewards, None (NaN) counting 0, NaN where all are None
    (as rlx.rewards.score_completions)."""
    w = torch.as_tensor(np.asarray(weights), dtype=per_fn.dtype)  # [K]
    total = (per_fn.nan_to_num(0.0) * w).sum(-1)
    total[per_fn.isnan().all(-1)] = math.nan
    return total


class DynamicWeighting(Feature):
    """The weighting state of one run and what the loop asks of it (module docstring)."""

    def __init__(self, cfg, names: list[str], method) -> None:
        self.cfg, self.names, self.method = cfg, names, method
        self.main, self.engine, self.eval_data = True, None, None  # set by start_weighting
        self.params: list[torch.nn.Parameter] = []  # gradient: the layers of the influences
        self.trainable: list[torch.nn.Parameter] = []  # gradient: all of them, for the clip
        self.validation: list[RewardFunction] = []  # hypervolume: the validation objectives
        self.optimizer = None  # hypervolume: whose learning rate the meta-reward scales
        self.scaled: list[tuple[dict, float, float]] = []  # (param group, lr, scaled lr)
        self.metrics: dict[str, float] = {}  # of the current step

    @property
    def weights(self) -> list[float]:
        return [float(w) for w in self.method.weights]

    @property
    def factor(self) -> float:
        """The learning rate's multiplier: the meta-reward (hypervolume), else 1."""
        return getattr(self.method, "factor", 1.0)

    def scale_learning_rate(self) -> None:
        """Multiply the optimizer's learning rate by the meta-reward until restore_learning_rate
        (the optimizer steps of this step's update)."""
        self.restore_learning_rate()
        factor = self.factor
        if factor == 1.0:
            return
        if self.optimizer is None:
            raise RuntimeError("DynamicWeighting.optimizer is not set: the meta-reward cannot act")
        self.scaled = [(g, g["lr"], g["lr"] * factor) for g in self.optimizer.param_groups]
        for group, _, scaled in self.scaled:
            group["lr"] = scaled

    def restore_learning_rate(self) -> None:
        """Undo scale_learning_rate, except in a param group whose learning rate the scheduler has
        set since (scheduler.step after the update: its new value is unscaled already)."""
        for group, lr, scaled in self.scaled:
            if group["lr"] == scaled:
                group["lr"] = lr
        self.scaled = []

    def reweigh(self, full: dict, backward: Callable, lr: float) -> tuple[dict, list[float]]:
        """`full` with its total recomputed under this step's weights, and the weights (gradient:
        after the mirror-descent step on this batch's influences). An objective that is None for every
        sample of the step keeps its weight, and the step logs none/<name>."""
        per_fn = full["per_fn"]  # [P, G, K]
        missing = [k for k in range(len(self.names)) if bool(per_fn[..., k].isnan().all())]
        self.metrics = {f"none/{self.names[k]}": 1.0 for k in missing}
        if missing and self.main:
            held = ", ".join(f"{self.names[k]} (weight {self.weights[k]:.3f})" for k in missing)
            print(f"weighting: {held}: None for every sample of the step; weight kept")
        if isinstance(self.method, GradientWeighting):
            infl = self.influences(full, backward, missing)
            if not all(i is None or math.isfinite(i) for i in infl):
                infl = self.non_finite(infl)
            self.method.step(infl, lr)
            pairs = zip(self.names, infl, strict=True)
            self.metrics |= {f"influence/{n}": i for n, i in pairs if i is not None}
        self.metrics |= {f"weight/{n}": w for n, w in zip(self.names, self.weights, strict=True)}
        return full | {"total": weighted_total(per_fn, self.weights)}, self.weights

    def influences(self, full: dict, backward: Callable, missing: list[int]) -> list:
        """I_k = <g_k, sum_j g_j> (without <g_k, g_k> when weighting.grad_self_term is false)
        over the objectives with a reward (None for the missing). g_k: `backward(advantages
        [P, G], keep [P])` on every group the step trains on (any objective varies: the whole
        batch's divisors) with objective k's own advantages (pg.objective_advantages), then the
        gradient of the chosen layers, after clipping the whole one. nan for every objective when
        a gradient is not finite (reweigh then applies bad_steps)."""
        algo, per_fn = self.cfg.algo, full["per_fn"]  # [P, G, K]
        total = weighted_total(per_fn, np.ones(per_fn.shape[-1]))  # NaN: no reward at all
        keep = pg.groups_to_keep(total, algo.dynamic_sampling, per_fn)  # [P], on every rank
        advantages = pg.objective_advantages(
            algo.learner,
            per_fn,
            full["length"],
            keep,
            algo.reward_normalization,
            scale_rewards=algo.scale_rewards,
        )  # [P, G, K], from the gathered rewards: the same on every rank
        grads = []
        for k in range(len(self.names)):
            if k in missing:
                continue
            if bool(advantages[..., k].any()):
                backward(advantages[..., k], keep)
                grads.append(self.clipped_gradient())
            else:  # constant in every group: no gradient from this objective
                grads.append(torch.zeros(sum(p.numel() for p in self.params)))
        for p in self.trainable:
            p.grad = None
        if not all(bool(torch.isfinite(g).all()) for g in grads):  # influences() would raise
            return [None if k in missing else math.nan for k in range(len(self.names))]
        self_term = self.cfg.weighting.grad_self_term
        values = iter(influences(grads, self_term).tolist() if grads else [])
        return [None if k in missing else next(values) for k in range(len(self.names))]

    def non_finite(self, infl: list) -> list:
        """A pass gave a non-finite gradient: bad_steps=error stops; skip keeps every weight this
        step (all influences None) and lets the loop's own finiteness check judge the update."""
        if self.cfg.bad_steps == "error":
            raise FloatingPointError(
                f"weighting.method=gradient: an objective's gradient is not finite "
                f"(influences {infl}); lower optim.lr or set bad_steps=skip"
            )
        if self.main:
            print("weighting: an objective's gradient is not finite; weights kept this step")
        self.metrics["weighting_non_finite"] = 1.0
        return [None] * len(infl)

    def clipped_gradient(self) -> torch.Tensor:
        """[D] the chosen layers' gradient, scaled as clipping the whole gradient to
        optim.max_grad_norm would (the reference clips, then restricts)."""
        max_norm, scale = self.cfg.optim.max_grad_norm, 1.0
        if max_norm > 0:
            norms = [p.grad.float().norm() for p in self.trainable if p.grad is not None]
            total = float(torch.stack(norms).norm()) if norms else 0.0
            scale = min(1.0, max_norm / (total + 1e-6))  # torch's clip_grad_norm_ formula
        parts = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
            for p in self.params
        ]
        return torch.cat(parts).cpu() * scale

    # ---------------------------------------------------------------- the loop's feature points

    def after_rewards(self, step) -> None:
        """The step's weights and the rewards' total under them (step: full, weights, backward,
        lr of recipes/pg.py's ScoredStep)."""
        self.restore_learning_rate()  # a skipped step (no after_step) may have left it scaled
        step.full, step.weights = self.reweigh(step.full, step.backward, step.lr)

    def after_advantages(self, step) -> None:
        """The hypervolume meta-reward scales the learning rate of this step's updates (the
        gradient method: factor 1, nothing changes)."""
        self.scale_learning_rate()
        if isinstance(self.method, HypervolumeWeighting):
            self.metrics["lr_factor"] = self.factor

    def state(self) -> dict:
        return {"weighting": self.state_dict()}

    def after_step(self, step: int) -> dict:
        """The step's metrics. Hypervolume, every weighting.hv_every steps: a validation point, its
        hypervolume contribution, the next meta-reward (and weights). Every rank evaluates
        (greedy on identical weights: the same point) so no rank waits for another's number.
        The learning rate is restored first: the checkpoint after this holds the unscaled one."""
        self.restore_learning_rate()
        if not isinstance(self.method, HypervolumeWeighting) or step % self.cfg.weighting.hv_every:
            return self.metrics
        point = self.validation_point(self.engine, self.eval_data)
        row = self.metrics | {
            f"val/{fn.name}": v for fn, v in zip(self.validation, point, strict=True)
        }
        if not all(math.isfinite(v) for v in point):  # an objective None on the whole slice
            if self.main:
                print(f"weighting: step {step}: validation point {point} is not finite; kept")
            return row | {"val_skipped": 1.0}
        return row | self.method.update(point)

    def validation_point(self, engine, eval_data) -> list[float]:
        """Mean of each validation objective on the first weighting.hv_prompts held-out prompts,
        greedy."""
        cfg = self.cfg
        data = eval_data.select(range(min(cfg.weighting.hv_prompts, len(eval_data))))
        summary = evaluate(engine, data, self.validation, cfg.eval.max_new_tokens, cfg.rollout.stop)
        return [summary["rewards"][fn.name] for fn in self.validation]

    def state_dict(self) -> dict:
        return self.method.state_dict()

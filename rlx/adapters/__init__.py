"""The adapter layer of the PG loop: build, merge and export adapters (PEFT for every method it
has), the off-principal guard, and the spectral diagnostics (docs/adapters.md).

    model = build_adapter(model, cfg.adapter, total_steps)      # PEFT-wrapped (method none: as is)
    hooks = install_step_hooks(policy, optimizer, cfg.adapter)  # guard + AdaLoRA, after each step
    hooks.start(s * updates_per_step)                           # AdaLoRA: rollout step s's budget
    loss = loss + extra_loss(policy)                            # AdaLoRA's orthogonality penalty
    merged_weights(model)                                       # HF-named weights, adapter merged

Modules: methods.py (one builder per method), merge.py (exact merge/restore), guard.py
(adapter.principal_guard), diff.py (dW per matrix), diagnostics.py (the metrics), probe.py (the
cheap per-step ones), sync.py (which methods an engine can serve as LoRA requests; the sync
itself is rlx/weight_sync.py).
"""

from __future__ import annotations

import contextlib
import time

import torch

from rlx.adapters.diff import weight_delta, weight_deltas
from rlx.adapters.guard import PrincipalGuard
from rlx.adapters.merge import base_weights, effective_weights, is_adapted, merged_weights
from rlx.adapters.methods import METHODS
from rlx.adapters.probe import SpectralProbe, check_probe_sharding
from rlx.adapters.sync import adapter_sync_fallback
from rlx.config import AdapterConfig, ConfigError
from rlx.features import Feature

__all__ = [
    "METHODS",
    "AdapterFeature",
    "PrincipalGuard",
    "SpectralProbe",
    "adapter_sync_fallback",
    "after_optimizer_step",
    "base_weights",
    "build_adapter",
    "check_probe_sharding",
    "diagnostics_row",
    "effective_weights",
    "extra_loss",
    "install_step_hooks",
    "is_adapted",
    "make_probe",
    "merged_weights",
    "saving_every_rank",
    "weight_delta",
    "weight_deltas",
]


def build_adapter(model, cfg: AdapterConfig, total_steps: int | None = None):
    """`model` with `cfg.method`'s adapter (a PEFT model), or `model` itself for method none.
    `total_steps`: the run's optimizer steps (AdaLoRA's budget, unless adalora.total_step)."""
    if not cfg.enabled:
        return model
    return METHODS[cfg.method](model, cfg, total_steps)


def _peft_model(model):
    """The PEFT model inside a DDP wrapper, or None."""
    model = getattr(model, "module", model)
    return model if is_adapted(model) else None


def _is_adalora(model) -> bool:
    peft = _peft_model(model)
    return peft is not None and peft.peft_config[peft.active_adapter].peft_type == "ADALORA"


def extra_loss(model) -> torch.Tensor | float:
    """What the adapter adds to the training loss: AdaLoRA's orthogonality penalty
    orth_reg_weight * mean over A, B of ||P P^T - I|| (as PEFT's AdaLoraModel.forward adds it
    to a loss the model computes itself); 0 for every other method."""
    if not _is_adalora(model):
        return 0.0
    peft = _peft_model(model)
    name = peft.active_adapter
    weight = peft.peft_config[name].orth_reg_weight
    terms = []
    for pname, p in peft.named_parameters():
        if ("lora_A" in pname or "lora_B" in pname) and name in pname and p.requires_grad:
            cov = p @ p.T if "lora_A" in pname else p.T @ p  # [r, r]
            eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return weight * torch.stack(terms).mean() if terms else 0.0


def after_optimizer_step(model, step: int, previous: int) -> None:
    """AdaLoRA's importance update and rank allocation at allocation step `step` (1-based, see
    StepHooks); it reads the gradients, so it runs before zero_grad. No-op for other methods.

    PEFT fixes the final rank pattern only at step total_step - tfinal exactly. Steps may jump
    over it (a skipped rollout step or dropped mini-batches leave theirs unused): when the last
    update's step `previous` lies before it and `step` after, the pattern is fixed first, as the
    uninterrupted schedule would have. Before any update was scored there is nothing to fix a
    pattern from, and every rank stays."""
    if not _is_adalora(model):
        return
    peft = _peft_model(model)
    adalora, config = peft.base_model, peft.peft_config[peft.active_adapter]
    fix = config.total_step - config.tfinal
    if step >= fix and config.rank_pattern is None and not adalora.rankallocator.ipt:
        return
    if previous < fix < step:
        adalora.update_and_allocate(fix)
    adalora.update_and_allocate(step)


@contextlib.contextmanager
def saving_every_rank(model):
    """Within it, save_pretrained writes every rank of an AdaLoRA adapter. Once AdaLoRA has
    pruned (its config holds a rank pattern), PEFT's save drops the pruned ranks and renames the
    pattern's keys: such a checkpoint no longer loads into a fresh, full-rank model, and resizing
    that model to load it would replace the parameters the optimizer holds. With the pattern set
    aside while saving, every rank is saved as the model holds it (E masked where the last
    allocation masked it), and the pattern travels in StepHooks.state_dict, restored after the
    weights. Other methods: no change."""
    if not _is_adalora(model):
        yield
        return
    peft = _peft_model(model)
    config = peft.peft_config[peft.active_adapter]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


ADALORA_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT's RankAllocator, per parameter
STEP_KEY = "adalora.step"  # StepHooks.step in the checkpoint's loop tensors


class StepHooks:
    """What runs after every optimizer step: AdaLoRA's allocation, then the principal guard.

    `step` is the allocation step of the last optimizer update, which AdaLoRA's budget schedule
    (tinit, tfinal, delta_t, total_step) reads. By default each update takes the next one. A loop
    whose updates per rollout step vary calls `start(first)` before each rollout step's updates:
    the PG loop gives rollout step s the steps s x U + 1, s x U + 2, ... (U = ppo_epochs x
    mini_batches, the updates a step makes at most), so the budget follows the rollout steps, as
    the learning-rate schedule does, and reaches its end with the run however many updates were
    dropped or skipped. `seconds` adds up the time spent here (the loop logs it per step as
    time_adapter_hooks_s)."""

    def __init__(self, model, guard: PrincipalGuard | None, guard_gradient: bool = False):
        self.model, self.guard, self.handles = model, guard, []
        self.step, self.next = 0, 1
        self.guard_gradient = guard_gradient and guard is not None
        self.seconds = 0.0

    def start(self, first: int) -> None:
        """The next optimizer updates take allocation steps first + 1, first + 2, ..."""
        self.next = first + 1

    def before_step(self, optimizer, args, kwargs) -> None:
        """adapter.guard_gradient: the gradients leave the principal subspaces before the step
        (torch.optim.Optimizer.register_step_pre_hook signature)."""
        t0 = time.perf_counter()
        self.guard.project_gradients()
        self.seconds += time.perf_counter() - t0

    def __call__(self, optimizer, args, kwargs) -> None:
        t0 = time.perf_counter()
        after_optimizer_step(self.model, self.next, self.step)
        self.step, self.next = self.next, self.next + 1
        if self.guard is not None:
            self.guard.apply()
        self.seconds += time.perf_counter() - t0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AdaLoRA's allocator state for the checkpoint ({} for other methods): the allocation
        step of the last update, the importance scores and their averages per parameter, and the
        rank pattern once there is one (a resumed run allocates exactly as an uninterrupted one
        would)."""
        if not _is_adalora(self.model):
            return {}
        peft = _peft_model(self.model)
        allocator, config = peft.base_model.rankallocator, peft.peft_config[peft.active_adapter]
        out = {STEP_KEY: torch.tensor(self.step)}
        for kind in ADALORA_SCORES:
            out |= {f"adalora.{kind}/{n}": t for n, t in getattr(allocator, kind).items()}
        for name, keep in (config.rank_pattern or {}).items():
            out[f"adalora.rank_pattern/{name}"] = torch.tensor(keep, dtype=torch.bool)
        return out

    def resume(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Continue with a checkpoint's `state_dict()`, after its weights are loaded. `step`: the
        allocation step of the last update where `tensors` do not hold it (checkpoints from
        before it was saved: one step per optimizer update)."""
        tensors = dict(tensors)
        self.step = int(tensors.pop(STEP_KEY, step))
        self.next = self.step + 1
        if not tensors or not _is_adalora(self.model):
            return
        peft = _peft_model(self.model)
        allocator, config = peft.base_model.rankallocator, peft.peft_config[peft.active_adapter]
        for key, tensor in tensors.items():
            kind, name = key.removeprefix("adalora.").split("/", 1)
            if kind == "rank_pattern":
                config.rank_pattern = (config.rank_pattern or {}) | {name: tensor.tolist()}
            else:
                getattr(allocator, kind)[name] = tensor

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """A copy of the hooks' state (the step count, AdaLoRA's allocator) to `restore` when a
        loop undoes optimizer steps (a skipped step)."""
        return self.step, {k: v.clone() for k, v in self.state_dict().items()}

    def restore(self, snapshot: tuple[int, dict[str, torch.Tensor]]) -> None:
        step, tensors = snapshot
        if _is_adalora(self.model):  # what the undone steps added goes too
            peft = _peft_model(self.model)
            peft.base_model.rankallocator.reset_ipt()
            peft.peft_config[peft.active_adapter].rank_pattern = None
        self.resume(step, tensors)

    def pop_seconds(self) -> dict:
        """{"adapter_hooks": seconds since the last call} when hooks are installed, else {}."""
        seconds, self.seconds = self.seconds, 0.0
        return {"adapter_hooks": seconds} if self.handles else {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def install_step_hooks(model, optimizer, cfg: AdapterConfig) -> StepHooks:
    """Register the adapter's after-step work on `optimizer` (an accelerate wrapper is unwrapped):
    the principal guard (adapter.principal_guard > 0; U_k, V_k from the weights now, so call it
    before a resume loads trained weights) and AdaLoRA's update_and_allocate; with
    adapter.guard_gradient also the guard's gradient projection before each step."""
    inner = getattr(optimizer, "optimizer", optimizer)
    guard = None
    if cfg.principal_guard:
        if type(inner).__module__.startswith("deepspeed"):
            raise ConfigError(
                "adapter.principal_guard does not work under DeepSpeed (its optimizer steps "
                "master weights the guard does not see); use plain DDP or one process"
            )
        guard = PrincipalGuard(
            getattr(model, "module", model), cfg.principal_guard, cfg.target_modules
        )
    hooks = StepHooks(model, guard, cfg.guard_gradient)
    if hooks.guard_gradient:
        hooks.handles.append(inner.register_step_pre_hook(hooks.before_step))
    if guard is not None or _is_adalora(model):
        hooks.handles.append(inner.register_step_post_hook(hooks))
    return hooks


def make_probe(model, cfg: AdapterConfig) -> SpectralProbe | None:
    """The cheap per-step diagnostics when adapter.diagnostics_every > 0 (build before a resume)."""
    if not cfg.diagnostics_every:
        return None
    model = getattr(model, "module", model)
    return SpectralProbe(model, cfg.target_modules, cfg.diagnostics_top_k, cfg.diagnostics_matrices)


def diagnostics_row(probe: SpectralProbe | None, model, step: int, every: int) -> dict:
    """The probe's diag/* metrics on steps that are a multiple of `every`, else {}."""
    if probe is None or not every or step % every:
        return {}
    return probe.metrics(getattr(model, "module", model))


class AdapterFeature(Feature):
    """The adapter's part of a training loop (rlx.features): after each step the optimizer-step
    hooks' time (time_adapter_hooks_s) and, every `every` steps, the spectral probe's diag/*
    metrics (main process only); AdaLoRA's allocator state in every checkpoint."""

    def __init__(
        self, hooks: StepHooks, probe: SpectralProbe | None, model, every: int, main: bool
    ):
        self.hooks, self.probe, self.model, self.every, self.main = hooks, probe, model, every, main

    def after_step(self, step: int) -> dict:
        times = {f"time_{k}_s": v for k, v in self.hooks.pop_seconds().items()}
        if not self.main:
            return times
        return times | diagnostics_row(self.probe, self.model, step, self.every)

    def tensors(self) -> dict:
        return self.hooks.state_dict()

"""DeepSpeed ZeRO through accelerate: what a training loop does differently when its model is sharded.

Launch with one of the `launch/*zero*.yaml` accelerate configs; without DeepSpeed every function
here does what plain DDP needs, so the loops call them unconditionally.

- `accelerator_kwargs`: on CPU, DeepSpeed needs the gloo backend named explicitly, and
  accelerate's `cpu=True` (which the loops use for DDP on CPU) would turn DeepSpeed off.
- `micro_batch` / `optimizer_step`: accelerate steps a DeepSpeed engine inside `backward` when
  gradients are synchronised, so a micro-batched update marks only its last micro-batch as the
  accumulation boundary, and the step itself (clipping included) has already happened after it.
  Without DeepSpeed no step is taken on a gradient that is not finite on some rank.
- `forward_passes`: under ZeRO-3 every forward gathers the parameters (a collective), so every
  rank must run as many forward/backward passes as the busiest one; the loop pads with passes at
  loss weight 0 (after dynamic sampling the ranks keep different numbers of groups).
- `prepare_frozen`: the KL term's reference model on the trainer's device; under ZeRO-3 sharded
  and wrapped by DeepSpeed like the policy (eval mode, no optimizer), as TRL does.
- `weight_chunks`: under ZeRO-3 every rank holds a slice of each weight; the full weights for the
  rollout engine or the final model are gathered a few tensors at a time
  (`deepspeed.zero.GatheredParameters`), so the whole model is never held twice.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator

import torch

from rlx import distributed
from rlx.config import ConfigError

# weights gathered at once under ZeRO-3: 16M elements (64 MiB in fp32) unless set
CHUNK_ELEMENTS = int(os.environ.get("RLX_ZERO3_GATHER_ELEMENTS", 16 * 2**20))


def deepspeed_requested() -> bool:
    """True when accelerate launched this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs() -> dict:
    """Accelerator(...) arguments for this launch: DDP over gloo on CPU (cpu=True), or DeepSpeed
    (over gloo on CPU, named explicitly; NCCL on GPUs)."""
    on_gpu = torch.cuda.is_available()
    if not deepspeed_requested():
        return {"cpu": not on_gpu}
    if on_gpu:
        return {}
    from accelerate import InitProcessGroupKwargs  # deferred: a second to import (rlx/recipe.py)

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def zero_stage(accelerator) -> int:
    """The ZeRO stage of this run; 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def configure(accelerator, max_grad_norm: float, adapter: bool) -> None:
    """Before `prepare`: the loop's batching and clipping in DeepSpeed's terms (one engine step
    per mini-batch, gradient clipping = optim.max_grad_norm). `adapter`: an adapter is trained."""
    stage = zero_stage(accelerator)
    if not stage:
        return
    if stage == 3 and adapter:
        raise ConfigError(
            "an adapter (adapter.method other than none) under DeepSpeed ZeRO-3 is not supported "
            "yet (the adapter merge for the rollout sync needs the full weights); use "
            "launch/cpu_2proc_zero2.yaml"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["gradient_clipping"] = max_grad_norm
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1


def forward_passes(accelerator, local: int) -> int:
    """How many micro-batch passes this rank runs when it has `local` of its own: the maximum over
    ranks under ZeRO-3 (a rank with fewer repeats one at loss weight 0), else `local`."""
    return distributed.max_over_ranks(local) if zero_stage(accelerator) == 3 else local


def prepare_frozen(accelerator, model):
    """A frozen model (the reference of the KL term) ready for forward passes beside the policy:
    under ZeRO-3 a DeepSpeed inference engine over the same stage-3 config (sharded; each forward
    gathers its layers), elsewhere the model moved to the trainer's device (ZeRO-1/2 shard only
    what a frozen model does not have: gradients and optimizer state)."""
    if zero_stage(accelerator) != 3:
        return model.to(accelerator.device)
    import deepspeed  # deferred: DeepSpeed is heavy and only ZeRO runs need it

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    ds_engine, *_ = deepspeed.initialize(model=model, config=config)
    ds_engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return ds_engine


def describe(accelerator, model) -> str:
    """One line for the run's start: the sharding, and this rank's share of the weights."""
    stage = zero_stage(accelerator)
    if not stage:
        return f"{accelerator.distributed_type.value}, full weights on every rank"
    return f"DeepSpeed ZeRO-{stage}, this rank holds {local_fraction(model):.2f} of the weights"


def local_fraction(model) -> float:
    """The share of the model's weight elements stored on this rank (ZeRO-3: about 1/ranks)."""
    local = total = 0
    for p in model.parameters():
        full = full_numel(p)
        total += full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
    return local / max(total, 1)


def full_numel(param: torch.Tensor) -> int:
    """Elements of a weight, also when ZeRO-3 holds only a slice of it on this rank."""
    return getattr(param, "ds_numel", param.numel())


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """Around one micro-batch's forward and backward: gradients are synchronised (and, under
    DeepSpeed, the engine steps) only after the last micro-batch of an update."""
    if not zero_stage(accelerator):
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
        return
    state = accelerator.gradient_state
    state._set_sync_gradients(last)  # accelerate's own switch for the accumulation boundary
    try:
        yield
    finally:
        state._set_sync_gradients(True)


def optimizer_step(accelerator, model, optimizer, trainable, max_grad_norm: float) -> float | None:
    """Clip and step after an update's backward passes, unless a gradient is not finite on some
    rank: then no step is taken, the gradients are dropped and None is returned (decided by all
    ranks together, so that a skip never leaves the ranks' weights apart). Returns the gradient
    norm otherwise (NaN when not clipped).

    Under DeepSpeed the engine has already clipped and stepped in the last backward: ZeRO-1/2 in
    fp32 skip a step whose gradient norm is not finite themselves (their overflow check, which
    also drops the gradients); ZeRO-3 in fp32 has no such check and applies it. Both return None
    here for a non-finite norm; the caller knows the stage (recipes/pg.py refuses to go on after
    a ZeRO-3 step it cannot undo)."""
    if zero_stage(accelerator):
        norm = model.get_global_grad_norm()
        if norm is None:  # DeepSpeed's norm computation is off: nothing to check
            return float("nan")
        return None if distributed.agree(not math.isfinite(float(norm))) else float(norm)
    norm = float("nan")
    if max_grad_norm > 0:  # the norm of a gradient with an inf or NaN is not finite
        norm = float(accelerator.clip_grad_norm_(trainable, max_grad_norm))
        finite = math.isfinite(norm)
    else:
        finite = all(bool(p.grad.isfinite().all()) for p in trainable if p.grad is not None)
    if distributed.agree(not finite):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def weight_chunks(model, export) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's HF-named weights in chunks, on every rank (a collective under ZeRO-3: all
    ranks must iterate). `export(model)` gives the unsharded weights (rlx.policy.export_weights);
    under ZeRO-3 the parameters are gathered CHUNK_ELEMENTS at a time instead."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if not partitioned:
        yield list(export(model))
        return
    import deepspeed  # deferred: as in prepare_frozen

    by_param = {}  # the state dict's names of each parameter (tied weights have two)
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_param.setdefault(id(tensor), (tensor, []))[1].append(name)
    groups, size, layer = [[]], 0, None  # whole decoder layers, about CHUNK_ELEMENTS a group
    for tensor, names in by_param.values():
        # vLLM loads a layer's fused weights (q/k/v, gate/up) only when they arrive together
        if size >= CHUNK_ELEMENTS and _layer_of(names[0]) != layer:
            groups.append([])
            size = 0
        groups[-1].append((tensor, names))
        size += full_numel(tensor)
        layer = _layer_of(names[0])
    for group in groups:
        params = [t for t, _ in group if hasattr(t, "ds_tensor")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield [(name, t.detach().clone()) for t, names in group for name in names]


def _layer_of(name: str) -> str:
    """The decoder layer a weight belongs to ("model.layers.3" for model.layers.3.mlp...), or the
    name itself outside the layer stack."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name

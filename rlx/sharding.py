"""DeepSpeed ZeRO through accelerate: what a training loop does differently when its model is sharded.

Launch with one of the `launch/*zero*.yaml` accelerate configs; without DeepSpeed every function
here does what plain DDP needs, so the loops call them unconditionally.

- `accelerator_kwargs`: on CPU, DeepSpeed needs the gloo backend named explicitly, and
  accelerate's `cpu=True` (which the loops use for DDP on CPU) would turn DeepSpeed off.
- `micro_batch` / `backward` / `optimizer_step` / `drop_gradients`: one update's micro-batched
  backward passes (only the last is the accumulation boundary), then its step, taken only when the
  update is finite on every rank; otherwise the accumulated gradients are dropped and nothing is
  applied. accelerate's own backward steps a DeepSpeed engine inside the boundary's backward,
  before any check could run, so under DeepSpeed `backward` calls the engine's backward alone and
  `optimizer_step` its step. Under DeepSpeed the loss is agreed finite on every rank before each
  backward (a non-finite loss never reaches the engine), and each local gradient is watched as it
  arrives (`GradientWatch`: ZeRO keeps no whole gradient to check, and its own overflow check
  only covers fp16, fp32 with the norm computed, and bf16 when asked).
- `forward_passes`: under DeepSpeed every rank must run as many forward/backward passes as the
  busiest one (ZeRO-3 gathers the parameters in each forward, ZeRO-2 reduces gradients after each
  backward, and each loss is agreed finite before its backward: all collectives); the loop pads
  with passes at loss weight 0 (after dynamic sampling the ranks keep different numbers of groups).
- `prepare_frozen`: the KL term's reference model on the trainer's device; under ZeRO-3 sharded
  and wrapped by DeepSpeed like the policy (eval mode, no optimizer), as TRL does.
- `whole_model_loading`: a model that is not sharded (the hf rollout engine's copy) loaded whole
  under a ZeRO-3 launch, where from_pretrained would build it partitioned.
- `weight_chunks`: under ZeRO-3 every rank holds a slice of each weight; the full weights for the
  rollout engine or the final model are gathered a few tensors at a time
  (`deepspeed.zero.GatheredParameters`), so the whole model is never held twice.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import weakref
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


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Models loaded within it are whole on this rank even under a ZeRO-3 launch. There
    transformers' from_pretrained builds a model under `deepspeed.zero.Init` (accelerate registers
    the ZeRO-3 config with transformers for the policy), which leaves every parameter an empty
    slice until DeepSpeed wraps the model; a model that is no DeepSpeed engine, such as the hf
    rollout engine's own copy, must be loaded whole. The registration is lifted while loading and
    put back after (accelerate's zero3_init_context_manager registers the same ZeRO-3 config
    again, so it does not do this). No change without DeepSpeed."""
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    registered = getattr(plugin, "dschf", None)  # the HfDeepSpeedConfig transformers reads
    if registered is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def forward_passes(accelerator, local: int) -> int:
    """How many micro-batch passes this rank runs when it has `local` of its own: the maximum over
    ranks under DeepSpeed (a rank with fewer repeats one at loss weight 0), else `local`."""
    return distributed.max_over_ranks(local) if zero_stage(accelerator) else local


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
    """Around one micro-batch's forward and backward: gradients are synchronised (under DeepSpeed:
    reduced into the engine's partitions for the step) only after the last micro-batch of an
    update, the accumulation boundary."""
    if not zero_stage(accelerator):
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
        return
    model.set_gradient_accumulation_boundary(last)  # before the forward, as DeepSpeed asks
    try:
        yield
    finally:
        model.set_gradient_accumulation_boundary(True)


def backward(accelerator, model, loss: torch.Tensor) -> bool:
    """One micro-batch's backward pass (inside `micro_batch`), without the optimizer step. Under
    DeepSpeed the loss is agreed finite on every rank first: when it is not on some rank, no rank
    runs the backward and False is returned (the caller drops the update: `drop_gradients`).
    Without DeepSpeed a non-finite loss goes through (ranks may run different numbers of passes,
    so there is no common point to agree on) and `optimizer_step` finds its gradient."""
    if not zero_stage(accelerator):
        accelerator.backward(loss)
        return True
    if distributed.agree(not bool(torch.isfinite(loss.detach()))):
        return False
    GradientWatch.of(model)  # watching from the first backward on
    model.backward(loss)  # the engine's, not accelerate's: that one would step at the boundary
    return True


def optimizer_step(accelerator, model, optimizer, trainable, max_grad_norm: float) -> float | None:
    """Clip and step after an update's backward passes, unless a gradient is not finite on some
    rank: then no step is taken, the gradients are dropped and None is returned (decided by all
    ranks together, so that a skip never leaves the ranks' weights apart). Returns the gradient
    norm otherwise (NaN when not clipped, or when DeepSpeed's norm computation is off).

    Under DeepSpeed the gradient checked is each backward's local one (GradientWatch): the
    reduced gradient the engine steps on is their sum over ranks, finite when all of them are.
    The engine clips and steps in `model.step()`; should DeepSpeed's own overflow check still
    skip the step (its norm not finite), it has dropped the gradients itself, and None is
    returned as well."""
    if zero_stage(accelerator):
        if distributed.agree(GradientWatch.of(model).take()):
            drop_gradients(accelerator, model, optimizer)
            return None
        model.step()
        norm = model.get_global_grad_norm()
        if norm is None:  # DeepSpeed's norm computation is off
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


def drop_gradients(accelerator, model, optimizer) -> None:
    """Forget the gradients accumulated since the last step without taking one (every rank).

    A DeepSpeed engine's own zero_grad clears only the parameters' .grad, and accelerate's wrapper
    of its optimizer ignores zero_grad: the reduced gradients live in the ZeRO optimizer's
    partitions. This clears what DeepSpeed's overflow branch of its step clears (deepspeed
    0.19.8, stage_1_and_2.py and stage3.py), and resets the accumulation to its first micro-step."""
    stage = zero_stage(accelerator)
    if not stage:
        optimizer.zero_grad(set_to_none=True)
        return
    GradientWatch.of(model).take()
    zero = model.optimizer
    zero.zero_grad(set_to_none=True)  # stage 3: also restarts the accumulation
    if stage == 3:
        zero.averaged_gradients = {}
        for bucket in zero.ipg_buckets.values():
            bucket.clear_params()
        return
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID  # deferred: heavy

    zero._release_preflattened_grad_buffers()
    for buffers in (zero.averaged_gradients, zero.all_grad_tensors):  # at and before the boundary
        for group in list(buffers):
            buffers[group] = None
    zero.micro_step_id = INITIAL_MICRO_STEP_ID


class GradientWatch:
    """Whether a gradient that is not finite arrived at a trainable weight since the last `take`:
    a hook on each weight sees every backward's local gradient as autograd delivers it, before
    DeepSpeed reduces it into its partitions. It works alike for every ZeRO stage and precision,
    where reading the partitioned gradients would depend on the stage's buffers. Costs one
    isfinite pass over the gradients per backward; one watch per engine, made on first use."""

    _watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, params):
        self.bad: torch.Tensor | None = None  # on the gradients' device: no sync per weight
        self.handles = [p.register_hook(self.check) for p in params if p.requires_grad]

    @classmethod
    def of(cls, engine) -> GradientWatch:
        """The watch over `engine`'s trainable weights (made now if it has none)."""
        if engine not in cls._watches:
            cls._watches[engine] = cls(engine.module.parameters())
        return cls._watches[engine]

    def check(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self.bad = bad if self.bad is None else self.bad | bad

    def take(self) -> bool:
        """True when a non-finite gradient arrived since the last take (on this rank); resets."""
        bad, self.bad = self.bad, None
        return bad is not None and bool(bad)


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

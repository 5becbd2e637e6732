"""Optional end-to-end tuning of the stored scales by distillation from the fine-tuned model.

After rounding, every quantised linear is W = (q - z) * s per (row, group), with integer codes q
and zero points z. This step keeps q and z fixed and tunes the scales s, together with the RMSNorm
weights (the export stores both in the scale dtype), to lower the token KL(fine-tuned || quantised)
on calibration blocks; the fine-tuned model, run alongside, is the teacher. Only numbers the
export already stores change, so the checkpoint's layout, size and serving speed stay the same.

It is EfficientQAT's second phase (E2E-QP, Chen et al. 2024, arXiv 2407.11062: train only the
quantisation step sizes end to end, weights frozen), with two changes:
- the loss is the KL to the fine-tuned model's next-token distribution instead of cross-entropy on
  the data's labels: the goal is to serve what the fine-tuned model does, and the KL carries its
  whole distribution at every position where a label carries one token;
- every tuned number x (a stored scale, an RMSNorm weight: the norms hold the folded AWQ scales)
  is tuned as x * exp(u) with u starting at 0, so one learning rate fits numbers of every size.
The teacher runs alongside (one extra forward per step) rather than caching its log-probabilities,
which would take blocks x seq_len x vocab values (2.4 GB in bf16 for 96 x 256 tokens of SmolLM2).
It runs only when `QuantizeConfig.tune.steps > 0`: on 2 CPU cores it costs minutes, on a GPU
seconds (README, "Tuning the scales").
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from rlx.quant.quantizer import QuantizedWeight


class _Gain(nn.Module):
    """Parametrisation x -> x * exp(u), with one u per run of `group` consecutive entries of a row.

    On a dequantised weight (q - z) * s with `group` the quantisation group size this is
    (q - z) * s * exp(u): the codes stay, the stored scale becomes s * exp(u).
    """

    def __init__(self, like: torch.Tensor, group: int):
        super().__init__()
        self.group = group
        shape = (*like.shape[:-1], like.shape[-1] // group, 1)
        self.log_gain = nn.Parameter(torch.zeros(shape, device=like.device))

    def gain(self) -> torch.Tensor:
        return self.log_gain.exp()[..., 0]  # [..., groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unflatten(-1, (-1, self.group)) * self.log_gain.exp()).flatten(-2)


def is_norm_weight(name: str) -> bool:
    """RMSNorm weights of a Llama-family model (input/post-attention norms and the final norm)."""
    return name.endswith("norm.weight")


def kl_first_last(losses: list[float]) -> tuple[float, float, int]:
    """Mean tuning KL over the first and the last tenth of the steps, and that step count (one
    step's KL is one batch's, so single steps are noisy)."""
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k, k


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


class _Step:
    """One tuning step (teacher forward, KL, backward, Adam), run eagerly or replayed from a CUDA
    graph.

    On the GPU an eager step of this model is bound by the CPU issuing ~10^4 small kernels (the
    parametrised weights included), not by the GPU: 0.2 s per step on an H200 for SmolLM2-135M.
    A CUDA graph records the whole step once and replays it with one launch. It needs every batch
    to have the same shape, Adam's state on the GPU (`capturable`), no autocast weight cache and
    a few eager steps on a side stream first (PyTorch's "whole network capture" recipe); if the
    capture fails the steps stay eager and `graph_error` says why.
    """

    WARMUP = 3  # eager steps before the capture (real steps: they count)

    def __init__(self, model, teacher, opt, autocast: bool, use_graph: bool):
        self.model, self.teacher, self.opt, self.autocast = model, teacher, opt, autocast
        self.use_graph, self.done = use_graph, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.static_ids: torch.Tensor | None = None  # the graph's input and output buffers
        self.static_loss: torch.Tensor | None = None

    def _forward_backward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            ids.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False
        ):
            with torch.no_grad():
                target = self.teacher(input_ids=ids, use_cache=False).logits
            loss = token_kl(target, self.model(input_ids=ids, use_cache=False).logits)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Run one step on `ids`; returns the loss (a tensor: no host sync)."""
        self.done += 1
        if self.graph is not None:
            self.static_ids.copy_(ids)
            self.graph.replay()
            return self.static_loss.clone()
        if not self.use_graph:
            self.opt.zero_grad(set_to_none=True)
            return self._forward_backward(ids)
        if self.done <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                loss = self._forward_backward(ids)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        return self._capture(ids)

    def _capture(self, ids: torch.Tensor) -> torch.Tensor:
        self.static_ids = ids.clone()
        self.opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_loss = self._forward_backward(self.static_ids)
        except RuntimeError as err:  # e.g. an op that syncs with the host: stay eager
            self.use_graph, self.graph_error = False, str(err).splitlines()[0]
            torch.cuda.synchronize()
            self.opt.zero_grad(set_to_none=True)
            return self._forward_backward(ids)
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.static_loss.clone()


def tune_scales(
    model: nn.Module,
    teacher: nn.Module,
    quantized: dict[str, QuantizedWeight],
    blocks: torch.Tensor,
    steps: int,
    lr: float,
    batch: int,
    dtype: torch.dtype,
    autocast: bool = True,
    show_progress: bool = True,
    cuda_graph: bool = True,
    report: dict | None = None,
) -> list[float]:
    """Tune the scales of `quantized` and `model`'s norm weights; returns the loss per step.

    `model` is the fake-quantised model (its quantised linears hold `quantized[name]`
    dequantised), `teacher` the fine-tuned model, `blocks` [N, L] calibration token blocks, taken
    `batch` at a time in order. On return every `quantized[name].scale` is replaced by the tuned
    scale rounded to `dtype`, and `model` holds exactly what the export will decode to: its
    linears dequantised from the new scales and its norm weights rounded to `dtype`.
    On a GPU, with `cuda_graph` and every batch the same size, the steps after the first few are
    replayed from a CUDA graph (`_Step`); `report`, if given, gets "cuda_graph": whether they were,
    and "cuda_graph_error" when the capture failed.
    """
    for p in itertools.chain(model.parameters(), teacher.parameters()):
        p.requires_grad_(False)
    tuned = {name: q.group_size for name, q in quantized.items()}
    tuned.update({n: 1 for n, _ in model.named_parameters() if is_norm_weight(n)})
    gains = {}  # name -> (module, tensor name, its _Gain)
    for name, group in tuned.items():
        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name)
        gains[name] = module, tensor, _Gain(getattr(module, tensor), group)
        parametrize.register_parametrization(module, tensor, gains[name][2])
    batches = torch.split(torch.arange(blocks.shape[0]), batch)
    use_graph = (
        cuda_graph
        and blocks.is_cuda
        and steps > _Step.WARMUP
        and len({len(b) for b in batches}) == 1
    )
    params = [gain.log_gain for _, _, gain in gains.values()]
    opt = torch.optim.Adam(params, lr=lr, capturable=use_graph)
    step = _Step(model, teacher, opt, autocast, use_graph)
    order = itertools.cycle(batches)
    losses: list[torch.Tensor] = []
    bar = tqdm(
        range(steps), desc="tune scales (KL to fine-tuned)", unit="step", disable=not show_progress
    )
    try:
        for i in bar:
            losses.append(step(blocks[next(order)]))
            if i % 10 == 0 or i == steps - 1:  # reading the loss waits for the GPU
                bar.set_postfix(kl=f"{losses[-1].item():.4f}")
    finally:  # the model and `quantized` agree even when interrupted
        with torch.no_grad():
            for name, (module, tensor, gain) in gains.items():
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
                if name in quantized:
                    q = quantized[name]
                    q.scale = (q.scale.float() * gain.gain()).to(dtype)
                    module.weight.copy_(q.dequantize())
                else:
                    param = getattr(module, tensor)
                    param.copy_((param * gain.gain()).to(dtype).float())
    if report is not None:
        report["cuda_graph"] = step.graph is not None
        if step.graph_error:
            report["cuda_graph_error"] = step.graph_error
    return torch.stack(losses).tolist() if losses else []

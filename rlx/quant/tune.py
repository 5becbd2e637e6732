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
It runs only when `QuantizeConfig.tune.steps > 0`: on this machine's 2 CPU cores it costs minutes
(README, "Tuning the scales").
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

    def __init__(self, shape: torch.Size, group: int):
        super().__init__()
        self.group = group
        self.log_gain = nn.Parameter(torch.zeros(*shape[:-1], shape[-1] // group, 1))

    def gain(self) -> torch.Tensor:
        return self.log_gain.exp()[..., 0]  # [..., groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unflatten(-1, (-1, self.group)) * self.log_gain.exp()).flatten(-2)


def is_norm_weight(name: str) -> bool:
    """RMSNorm weights of a Llama-family model (input/post-attention norms and the final norm)."""
    return name.endswith("norm.weight")


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


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
) -> list[float]:
    """Tune the scales of `quantized` and `model`'s norm weights; returns the loss per step.

    `model` is the fake-quantised model (its quantised linears hold `quantized[name]`
    dequantised), `teacher` the fine-tuned model, `blocks` [N, L] calibration token blocks, taken
    `batch` at a time in order. On return every `quantized[name].scale` is replaced by the tuned
    scale rounded to `dtype`, and `model` holds exactly what the export will decode to: its
    linears dequantised from the new scales and its norm weights rounded to `dtype`.
    """
    for p in itertools.chain(model.parameters(), teacher.parameters()):
        p.requires_grad_(False)
    tuned = {name: q.group_size for name, q in quantized.items()}
    tuned.update({n: 1 for n, _ in model.named_parameters() if is_norm_weight(n)})
    gains = {}
    for name, group in tuned.items():
        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name)
        gains[name] = _Gain(getattr(module, tensor).shape, group)
        parametrize.register_parametrization(module, tensor, gains[name])
    opt = torch.optim.Adam([g.log_gain for g in gains.values()], lr=lr)
    order = itertools.cycle(torch.split(torch.arange(blocks.shape[0]), batch))
    losses: list[float] = []
    bar = tqdm(range(steps), desc="tune scales (KL to fine-tuned)", unit="step",
               disable=not show_progress)  # fmt: skip
    try:
        for _ in bar:
            ids = blocks[next(order)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with torch.no_grad():
                    target = teacher(input_ids=ids, use_cache=False).logits
                loss = token_kl(target, model(input_ids=ids, use_cache=False).logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:  # the model and `quantized` agree even when interrupted
        with torch.no_grad():
            for name, gain in gains.items():
                module_name, _, tensor = name.rpartition(".")
                module = model.get_submodule(module_name)
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
                if name in quantized:
                    q = quantized[name]
                    q.scale = (q.scale.float() * gain.gain()).to(dtype)
                    module.weight.copy_(q.dequantize())
                else:
                    param = getattr(module, tensor)
                    param.copy_((param * gain.gain()).to(dtype).float())
    return losses

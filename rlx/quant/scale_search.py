"""AWQ-style per-channel scale search and weight-clipping search for one decoder layer.

For each scaling group (q/k/v after input_layernorm, o after v, gate/up after
post_attention_layernorm, down after up) and each alpha in {0, 1/n, ..., (n-1)/n}: scales =
importance^alpha; every linear of the group becomes Q(W diag(scales)) diag(scales)^-1; the alpha
whose inspected module (the attention block, o_proj, the MLP, down_proj) gives the smallest output
MSE against the full-precision layer on the calibration activations wins. Then 1/scales is folded
into the preceding norm or linear (exact: the layer computes the same function before
quantisation), and the clipping search (if on: by default only before rounding to nearest, see
QuantizeConfig.clip) picks, per output row and group, the clip range in
{max|w| (1 - i/n)}, i < n * max_shrink, that minimises the linear's output MSE. q and k are not
clipped (as in llm-awq: their error is amplified by the attention softmax).

Deviations from llm-awq / QuantLRM, each for a stated reason:
- o_proj scales are tied across the query heads that share a KV head (importance averaged over
  them), so that they fold exactly into v_proj under grouped-query attention. llm-awq skips o_proj
  for GQA models; QuantLRM's code searches untied scales and averages them afterwards, so the
  applied scales differ from the searched ones.
- The clipping error is computed as d^T (X^T X / T) d per group from the Gram matrix of ALL
  calibration tokens instead of a 512-token subsample: the same mean squared output error, cheaper.
- Scales are normalised by sqrt(max * min) (llm-awq; QuantLRM's fork drops it). It changes nothing
  in exact arithmetic and keeps QuantLRM's large (importance x zero-count) values in range.
- The searches run the layer in `search_dtype` (bfloat16 by default: 4-5x faster on CPUs with AMX;
  int4 errors are far above bf16 rounding). Scales are applied and weights quantised in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlx.quant.gptq import gptq_quantize_shared, hessian
from rlx.quant.quantizer import QuantizedWeight, clip_groups, fake_quantize


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input and one scale vector, and where the scale is folded."""

    name: str
    prev: str  # 1/scales is folded into this module's output (a norm or a linear)
    linears: tuple[str, ...]  # inputs multiplied by scales; linears[0] gives the importance
    inspect: str  # module whose output MSE chooses alpha


SCALE_GROUPS = (
    ScaleGroup(
        "qkv",
        "input_layernorm",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn",
    ),
    ScaleGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

NOT_CLIPPED = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass(frozen=True)
class HeadLayout:
    """Attention head counts, for tying o_proj scales to KV heads."""

    heads: int
    kv_heads: int
    head_dim: int

    def to_kv(self, v: torch.Tensor) -> torch.Tensor:
        """[heads * head_dim] -> [kv_heads * head_dim]: mean over the heads sharing a KV head."""
        per_kv = self.heads // self.kv_heads
        return v.view(self.kv_heads, per_kv, self.head_dim).mean(1).reshape(-1)

    def to_heads(self, v: torch.Tensor) -> torch.Tensor:
        """[kv_heads * head_dim] -> [heads * head_dim]: each query head takes its KV head's value."""
        per_kv = self.heads // self.kv_heads
        return v.view(self.kv_heads, 1, self.head_dim).expand(-1, per_kv, -1).reshape(-1)


def alpha_scales(importance: torch.Tensor, alpha: float) -> torch.Tensor:
    """importance^alpha, floored at 1e-4 and normalised by sqrt(max * min)."""
    s = importance.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _run(module: nn.Module, name: str, x: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
    if name == "self_attn":
        return module(hidden_states=x, **attn_kwargs)[0]
    return module(x)


def search_group_scales(
    work: nn.Module,
    master: nn.Module,
    group: ScaleGroup,
    x: torch.Tensor,
    importance: torch.Tensor,
    quantize: Callable[[str, torch.Tensor], torch.Tensor],
    heads: HeadLayout,
    n_grid: int,
    attn_kwargs: dict,
) -> tuple[torch.Tensor, float, list[float]]:
    """Best scales for `group` (in the prev module's output space), its alpha and the MSE curve.

    `work` is the layer in the search dtype (its weights are swapped and restored), `master` the
    float32 layer whose weights are quantised; `quantize(name, w)` fake-quantises one weight.
    """
    inspect = work.get_submodule(group.inspect)
    tied = group.name == "o" and heads.heads != heads.kv_heads
    if tied:
        importance = heads.to_kv(importance)
    with torch.no_grad():
        reference = _run(inspect, group.inspect, x, attn_kwargs).float()
        weights = {n: master.get_submodule(n).weight.detach().float() for n in group.linears}
        originals = {n: work.get_submodule(n).weight.data for n in group.linears}
        losses = []
        for step in range(n_grid):
            s = alpha_scales(importance, step / n_grid)
            s_in = heads.to_heads(s) if tied else s  # [in_features]
            for n, w in weights.items():
                q = quantize(n, w * s_in) / s_in  # [O, I]
                work.get_submodule(n).weight.data = q.to(originals[n].dtype)
            out = _run(inspect, group.inspect, x, attn_kwargs).float()
            losses.append(torch.nn.functional.mse_loss(out, reference).item())
        for n, w in originals.items():
            work.get_submodule(n).weight.data = w
    best = min(range(n_grid), key=losses.__getitem__)
    return alpha_scales(importance, best / n_grid), best / n_grid, losses


def fold_scales(layer: nn.Module, group: ScaleGroup, s: torch.Tensor, heads: HeadLayout) -> None:
    """Multiply the group's linear inputs by `s` and divide the prev module's output by it."""
    prev = layer.get_submodule(group.prev)
    s_in = (
        heads.to_heads(s) if s.numel() != layer.get_submodule(group.linears[0]).in_features else s
    )
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # RMSNorm: y = w * x / rms(x)
            prev.weight.div_(s.to(prev.weight.dtype))
        for n in group.linears:
            lin = layer.get_submodule(n)
            lin.weight.mul_(s_in.view(1, -1).to(lin.weight.dtype))


def gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group second moments X_g^T X_g / T: [G, g, g] from activations [..., C]."""
    flat = x.reshape(-1, x.shape[-1]).float()  # [T, C]
    t = flat.shape[0]
    xg = flat.view(t, -1, group_size).transpose(0, 1)  # [G, T, g]
    return torch.bmm(xg.transpose(1, 2), xg) / t


def search_clip(
    w: torch.Tensor,
    gram_g: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per (row, group) clip value max_val [O, G] minimising the output MSE d^T Gram d."""
    w = w.float()
    out_features = w.shape[0]
    org_max = w.view(out_features, -1, group_size).abs().amax(-1)  # [O, G]
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        dq = fake_quantize(clip_groups(w, group_size, max_val), bits, group_size) - w  # [O, I]
        d = dq.view(out_features, -1, group_size).transpose(0, 1)  # [G, O, g]
        err = (torch.bmm(d, gram_g) * d).sum(-1).T  # [O, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, max_val, best)
    return best


def capture_inputs(
    work: nn.Module, x: torch.Tensor, layer_kwargs: dict
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of each scale group's linears when `work` runs on hidden states `x`, and its output."""
    feats: dict[str, torch.Tensor] = {}
    hooks = []
    for group in SCALE_GROUPS:
        name = group.linears[0]

        def hook(_module, args, _out, name=name):
            feats[name] = args[0].detach()

        hooks.append(work.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = work(x, **layer_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return feats, out


@dataclass
class LayerReport:
    """What the searches chose for one layer, and its full-precision output (next layer's input)."""

    alphas: dict[str, float]
    clipped: list[str]
    output: torch.Tensor  # [N, L, H] in the search dtype
    quantized: dict[str, QuantizedWeight]  # GPTQ-rounded linears by local name ({} = round later)


def awq_layer(
    layer: nn.Module,
    x: torch.Tensor,
    layer_kwargs: dict,
    importance: Callable[[str, torch.Tensor], torch.Tensor],
    group_sizes: dict[str, int],
    bits: int,
    heads: HeadLayout,
    n_grid: int = 20,
    clip: bool = True,
    clip_grid: int = 20,
    clip_max_shrink: float = 0.5,
    search_dtype: torch.dtype = torch.bfloat16,
    gptq_dtype: torch.dtype | None = None,
    act_order: bool = False,
) -> LayerReport:
    """Scale search, folding and clipping for one float32 decoder layer, in place.

    `x` [N, L, H] is the layer's input on the calibration data (already in `search_dtype`);
    `importance(linear_name, its_input)` gives the channel importance of a group's first linear.
    As in llm-awq, the next layer's input is this layer's unquantised output. With `gptq_dtype`
    (the export's scale dtype) every linear is then GPTQ-rounded on the scaled calibration inputs
    (rlx.quant.gptq, in `act_order` if set) and returned in `quantized`; otherwise the caller
    rounds to nearest.
    """
    work = copy.deepcopy(layer).to(search_dtype)
    feats, output = capture_inputs(work, x, layer_kwargs)
    attn_kwargs = {
        k: layer_kwargs[k] for k in ("position_embeddings", "attention_mask") if k in layer_kwargs
    }

    def quantize(name: str, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, bits, group_sizes[name])

    found = {}
    for group in SCALE_GROUPS:
        src = group.linears[0]
        imp = importance(src, feats[src])
        found[group.name] = search_group_scales(
            work, layer, group, feats[src], imp, quantize, heads, n_grid, attn_kwargs
        )
    del work
    for group in SCALE_GROUPS:  # all searches ran on the unscaled layer, as in llm-awq
        s = found[group.name][0]
        fold_scales(layer, group, s, heads)
        src = group.linears[0]
        s_in = heads.to_heads(s) if s.numel() != feats[src].shape[-1] else s
        feats[src] = feats[src].float() / s_in
    clipped = []
    if clip:
        grams: dict[tuple[str, int], torch.Tensor] = {}
        for group in SCALE_GROUPS:
            for name in group.linears:
                if name in NOT_CLIPPED:
                    continue
                g = group_sizes[name]
                key = (group.linears[0], g)
                if key not in grams:
                    grams[key] = gram(feats[group.linears[0]], g)
                lin = layer.get_submodule(name)
                max_val = search_clip(lin.weight, grams[key], bits, g, clip_grid, clip_max_shrink)
                with torch.no_grad():
                    lin.weight.copy_(clip_groups(lin.weight.float(), g, max_val))
                clipped.append(name)
    quantized = {}
    if gptq_dtype is not None:
        for group in SCALE_GROUPS:  # the linears of a group read the same (scaled) input
            h = hessian(feats[group.linears[0]])
            for size in {group_sizes[name] for name in group.linears}:
                names = [name for name in group.linears if group_sizes[name] == size]
                weights = [layer.get_submodule(name).weight for name in names]
                results = gptq_quantize_shared(
                    weights, h, bits, size, gptq_dtype, act_order=act_order
                )
                quantized.update(zip(names, results, strict=True))
    return LayerReport({k: v[1] for k, v in found.items()}, clipped, output, quantized)

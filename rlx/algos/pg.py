"""Policy-gradient math shared by GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE(++): pure functions.

Every learner of the family is one choice from each table below; the training loop in
recipes/pg.py calls these and nothing else does the math. Shapes: P prompts, G completions per
prompt, B = P*G sequences, T completion tokens (right-padded), V vocabulary.

    advantages  ADVANTAGES[name](rewards [P, G]) -> [P, G]; several rewards: kept_advantages(...),
                each reward's own part: objective_advantages(...) -> [P, G, K]
    logprobs    token_logprobs(logits [B, T, V], tokens [B, T]) -> [B, T]
    loss        policy_loss(logprobs, old, sampler, ref, advantages, mask, algo, divisors)
                -> (scalar, metrics): the whole objective, built from
                clipped_policy_loss(...) -> per-token loss, low / high clip indicators [B, T],
                importance_weights(logp_trainer, logp_sampler, mask, mode) -> [B, T] or [B, 1]
                (the sampler correction), k3_kl(...) and aggregate_loss(...) -> scalar

Deviations from the papers, on purpose: REINFORCE++ whitens per-sequence rewards weighted by token
count (identical to whitening over all tokens when every token of a sequence shares its advantage,
which holds here because rlx uses no per-token KL reward shaping); the KL to the reference is the k3
estimator added to the loss (GRPO style), not folded into the reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlx.config.choices import (
    IMPORTANCE_LEVELS,
    LOSS_AGGREGATIONS,
    REWARD_SCALES,
    TIS_MODES,
)
from rlx.config.choices import REWARD_NORMALIZATIONS as NORMALIZATIONS

EPS = 1e-4  # TRL's, added to the group std (GRPO, GDPO); all-equal groups are 0 before it
WHITEN_EPS = 1e-6  # REINFORCE++'s batch whitening (no TRL counterpart): std 1 to 1e-6

# ----------------------------------------------------------------------------- advantages


def _nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaNs, as TRL's nanstd: NaN where fewer than 2 values are not NaN."""
    dims = tuple(range(values.dim())) if dim is None else (dim,)
    mean = values.nanmean(dim=dims, keepdim=True)
    var = ((values - mean) ** 2).nanmean(dim=dims, keepdim=keepdim)
    count = (~values.isnan()).sum(dim=dims, keepdim=keepdim).to(values.dtype)
    var = torch.where(count > 1, var * count / (count - 1), torch.full_like(var, float("nan")))
    return var.sqrt()


def _all_equal(values: torch.Tensor, dim: int) -> torch.Tensor:
    """True (keepdim) where the non-NaN values along `dim` are all equal (or there are none)."""
    top = values.nan_to_num(nan=-torch.inf).amax(dim=dim, keepdim=True)
    bottom = values.nan_to_num(nan=torch.inf).amin(dim=dim, keepdim=True)
    return ~(top > bottom)


def _centred(values: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """values - their NaN-ignoring mean along `dim`, exactly 0 where they are all equal: the
    float32 mean of 8 x 0.99 is 1 ulp off, which / (std ~ 0 + eps) gave the whole group one
    same-sign advantage. TRL keeps that residue (1.2e-3 there); rlx gives 0 on purpose."""
    centred = values - values.nanmean(dim=dim, keepdim=True)
    return centred.masked_fill(_all_equal(values, dim), 0.0)


def grpo_advantages(rewards: torch.Tensor, eps: float = EPS, scale: str = "group") -> torch.Tensor:
    """(r - group mean) / (std + eps). [P, G] -> [P, G]. The std is the unbiased one, as in TRL,
    of the group (scale "group") or of every reward of the batch (scale "batch", TRL's
    scale_rewards="batch"); 0 when there is a single value. A group of equal rewards gets 0."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {scale!r}: choose one of {REWARD_SCALES}")
    centred = _centred(rewards)  # [P, G]
    zero = torch.zeros_like(rewards[:, :1])  # [P, 1]
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else zero  # scalar
    else:
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else zero
    return centred / (std + eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - group mean, no division by the std (removes the difficulty bias)."""
    return _centred(rewards)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i - mean of the other G-1 rewards of the group = G/(G-1) * (r_i - group mean)."""
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (num_samples >= 2)")
    return g / (g - 1) * _centred(rewards)


def _whiten(values: torch.Tensor, weights: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(values - mean) / (std + eps) over the whole batch (weighted); 0 if all are equal."""
    if bool(_all_equal(values.reshape(-1), 0)):
        return torch.zeros_like(values)
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    mean = (values * w).sum() / w.sum()
    var = ((values - mean) ** 2 * w).sum() / w.sum()
    return (values - mean) / (var.sqrt() + eps)


def reinforce_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """REINFORCE++: rewards whitened over the whole batch (token-weighted when lengths given)."""
    return _whiten(rewards, lengths, eps)


def reinforce_baseline_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the whole batch. A group of
    equal rewards stays 0 (token-weighted whitening would shift it by -mean / std)."""
    whitened = _whiten(dr_grpo_advantages(rewards), lengths, eps)
    return whitened.masked_fill(_all_equal(rewards, 1), 0.0)


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce": reinforce_advantages,
    "reinforce_baseline": reinforce_baseline_advantages,
}


def _check_estimator(name: str, scale_rewards: str) -> None:
    if name not in ADVANTAGES:
        raise ValueError(
            f"unknown advantage estimator {name!r}: choose one of {sorted(ADVANTAGES)}"
        )
    if scale_rewards not in REWARD_SCALES:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}: choose one of {REWARD_SCALES}")
    if scale_rewards != "group" and name != "grpo":
        raise ValueError(f"scale_rewards={scale_rewards!r} is defined for learner=grpo, not {name}")


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    scale_rewards: str = "group",
    eps: float | None = None,
) -> torch.Tensor:
    """Dispatch by name; `lengths` [P, G] only matters for the globally whitened estimators,
    `scale_rewards` ("group" or "batch") only for grpo, `eps` for those dividing by a std
    (None: EPS for grpo, WHITEN_EPS for the reinforce whitening)."""
    _check_estimator(name, scale_rewards)
    if name.startswith("reinforce"):
        return ADVANTAGES[name](rewards, lengths, WHITEN_EPS if eps is None else eps)
    if name == "grpo":
        return grpo_advantages(rewards, EPS if eps is None else eps, scale_rewards)
    return ADVANTAGES[name](rewards)


# ----------------------------------------------------------------------------- logprobs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """log softmax(logits / temperature)[token] per position. [B, T, V], [B, T] -> [B, T] fp32.

    Memory-frugal: logit[token] - logsumexp(logits), computed per sequence so no [B, T, V]
    log-softmax tensor is materialised (logsumexp's backward recomputes from the logits).
    """
    rows = []
    for seq_logits, seq_tokens in zip(logits, tokens, strict=True):
        scaled = seq_logits.float() / temperature  # [T, V]
        picked = scaled.gather(-1, seq_tokens[:, None])[:, 0]  # [T]
        rows.append(picked - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, one sequence at a time. -> [B, T]."""
    rows = []
    for seq_logits in logits:
        scaled = seq_logits.float() / temperature  # [T, V]
        logp = torch.log_softmax(scaled, dim=-1)
        rows.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- losses


def sequence_log_ratio(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor):
    """GSPO: the length-normalised sequence log-ratio, mean_t (logp - logp_old). -> [B, 1]."""
    return ((logp - logp_old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(
        min=1
    )


def clipped_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    level: str = "token",
):
    """PPO clip with separate bounds: -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A).

    logp, logp_old, mask: [B, T]; advantages: [B]. level "token" (GRPO / DAPO) or "sequence"
    (GSPO: one ratio per sequence, broadcast over the tokens). Returns (per-token loss [B, T],
    low_clipped [B, T], high_clipped [B, T]); the indicators are 0/1 floats, as TRL's metrics:
    low = ratio < 1 - eps_low with A < 0, high = ratio > 1 + eps_high with A > 0. They are not
    masked (the caller masks).
    """
    if level == "token":
        log_ratio = logp - logp_old  # [B, T]
    elif level == "sequence":
        log_ratio = sequence_log_ratio(logp, logp_old, mask)  # [B, 1], gradient through every token
    else:
        raise ValueError(f"importance level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped).expand_as(logp)  # [B, T]
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).expand_as(logp).float()  # [B, T]
        high = ((ratio > 1 + eps_high) & (adv > 0)).expand_as(logp).float()
    return per_token, low, high


def _divisor(count: float) -> float:
    """A loss divisor: the count, or 1 where nothing was counted (0 / 0 would give NaN)."""
    return count if count > 0 else 1


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    max_completion_length: int = 0,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce [B, T] to a scalar.

    sequence_mean (GRPO): mean over sequences of each sequence's token mean.
    token_mean (DAPO): sum over all tokens / number of tokens.
    constant_length (Dr. GRPO): sum over all tokens / (B * max_completion_length).

    The divisors default to this tensor's own sequence and token counts. A micro-batch of a larger
    batch passes the whole batch's `num_sequences` / `num_tokens`, so that the micro-batches'
    losses (and gradients) add up to the whole batch's. A count of 0 (every sequence masked, e.g.
    by mask_truncated_completions) divides by 1: the masked sum is 0, so is the loss.
    """
    masked = per_token * mask  # [B, T]
    sequences = _divisor(per_token.shape[0] if num_sequences is None else num_sequences)
    if mode == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    if mode == "token_mean":
        tokens = mask.sum().clamp(min=1) if num_tokens is None else _divisor(num_tokens)
        return masked.sum() / tokens
    if mode == "constant_length":
        if max_completion_length <= 0:
            raise ValueError("constant_length aggregation needs max_completion_length > 0")
        return masked.sum() / (sequences * max_completion_length)
    raise ValueError(f"unknown loss aggregation {mode!r}: choose one of {LOSS_AGGREGATIONS}")


def _check_options(name: str, normalization: str, scale_rewards: str) -> None:
    _check_estimator(name, scale_rewards)
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown reward normalization {normalization!r}: choose one of {NORMALIZATIONS}"
        )
    if normalization == "normalize_then_sum" and name != "grpo":
        raise ValueError(f"normalize_then_sum is defined for learner=grpo, not {name}")


def _group_zscores(per_fn: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Each reward normalised in its group, (r - mean) / (std + eps), NaN rewards skipped (and
    kept NaN); 0 in a group where the reward is constant. [P, G, K] -> [P, G, K]."""
    g = per_fn.shape[1]
    centred = _centred(per_fn).masked_fill(per_fn.isnan(), float("nan"))  # [P, G, K]
    std = _nanstd(per_fn, dim=1, keepdim=True) if g > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + eps)


def _normalize_then_sum(
    per_fn: torch.Tensor, weights: list[float], eps: float = EPS
) -> torch.Tensor:
    """GDPO (TRL's normalize_then_sum): each reward normalised in its group, weighted sum, then
    normalised over the batch. NaN rewards are skipped; a sample with no reward gets 0. -> [P, G]."""
    w = torch.tensor(weights, dtype=per_fn.dtype, device=per_fn.device)  # [K]
    summed = (_group_zscores(per_fn, eps) * w).nansum(-1)  # [P, G]
    summed[per_fn.isnan().all(-1)] = float("nan")  # unscorable: out of the batch statistics
    std = _nanstd(summed) if summed.numel() > 1 else torch.zeros_like(summed)
    advantages = torch.nan_to_num(_centred(summed.reshape(-1), 0).view_as(summed) / (std + eps))
    return advantages.masked_fill(_all_equal(per_fn, 1).all(-1), 0.0)  # every reward constant


def weighted_advantages(
    name: str,
    total: torch.Tensor,
    per_fn: torch.Tensor,
    lengths: torch.Tensor,
    weights: list[float],
    normalization: str,
    eps: float | None = None,
    *,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """[P, G] advantages of several rewards. `total` [P, G] is their weighted sum, `per_fn`
    [P, G, K] each function's reward (NaN: "not applicable"), `lengths` [P, G] completion lengths.
    "sum_then_normalize": the advantage of the total (NaN counts as 0). "normalize_then_sum"
    (grpo only, as TRL; scale_rewards does not apply): see _normalize_then_sum."""
    _check_options(name, normalization, scale_rewards)
    if normalization == "normalize_then_sum":
        return _normalize_then_sum(per_fn, weights, EPS if eps is None else eps)
    return compute_advantages(
        name, torch.nan_to_num(total), lengths, scale_rewards=scale_rewards, eps=eps
    )


def groups_to_keep(
    total: torch.Tensor, dynamic_sampling: bool, per_fn: torch.Tensor | None = None
) -> torch.Tensor:
    """[P] bool: groups with a reward for every sample and, with dynamic sampling (DAPO), whose
    rewards are not all equal (such a group has zero advantage everywhere). Given `per_fn`
    [P, G, K] (normalize_then_sum), a group is kept when any one reward's non-NaN values vary,
    even if the total does not. One-sample groups (REINFORCE++ with num_samples=1) have no spread
    to test and are kept."""
    keep = torch.isfinite(total).all(dim=1)
    if dynamic_sampling and total.shape[1] > 1:
        if per_fn is None:
            keep &= (total.max(dim=1).values - total.min(dim=1).values) > 1e-9
        else:
            top = per_fn.nan_to_num(nan=-torch.inf).amax(dim=1)  # [P, K]; -inf: no value
            bottom = per_fn.nan_to_num(nan=torch.inf).amin(dim=1)
            keep &= ((top - bottom) > 1e-9).any(dim=-1)
    return keep


def kept_advantages(
    name: str,
    total: torch.Tensor,
    per_fn: torch.Tensor,
    lengths: torch.Tensor,
    weights: list[float],
    normalization: str,
    dynamic_sampling: bool,
    eps: float | None = None,
    *,
    scale_rewards: str = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [P, G], keep [P]): which groups train, then their advantages computed over the
    kept groups only (filter first, then normalise, as verl's DAPO does), 0 for dropped groups.
    The order matters for the batch-normalised advantages (reinforce, reinforce_baseline,
    scale_rewards="batch", normalize_then_sum)."""
    _check_options(name, normalization, scale_rewards)
    spread = per_fn if normalization == "normalize_then_sum" else None
    keep = groups_to_keep(total, dynamic_sampling, spread)  # [P]
    advantages = torch.zeros_like(total)  # [P, G]
    if keep.any():
        advantages[keep] = weighted_advantages(
            name,
            total[keep],
            per_fn[keep],
            lengths[keep],
            weights,
            normalization,
            eps,
            scale_rewards=scale_rewards,
        )
    return advantages, keep


def objective_advantages(
    name: str,
    per_fn: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    normalization: str,
    eps: float | None = None,
    *,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """[P, G, K] each reward's own advantages on the groups `keep` [P] (0 elsewhere, and where the
    reward is None): the part of the step's advantages that reward contributes before the weights.
    "normalize_then_sum": its group z-score (GDPO's term before the weighted sum and the batch
    re-normalisation, which scale every reward alike); "sum_then_normalize": the estimator on that
    reward alone (None counts 0). The gradient-based weighting's per-objective gradients."""
    _check_options(name, normalization, scale_rewards)
    out = torch.zeros_like(per_fn)  # [P, G, K]
    if not keep.any():
        return out
    kept = per_fn[keep]  # [p, G, K]
    if normalization == "normalize_then_sum":
        out[keep] = _group_zscores(kept, EPS if eps is None else eps).nan_to_num(0.0)
        return out
    for k in range(per_fn.shape[-1]):
        out[keep, :, k] = compute_advantages(
            name, kept[..., k].nan_to_num(0.0), lengths[keep], scale_rewards=scale_rewards, eps=eps
        )
    return out


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@torch.no_grad()
def importance_weights(
    logp_trainer: torch.Tensor,
    logp_sampler: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_truncate",
    cap: float = 2.0,
    floor: float = 0.0,
) -> torch.Tensor:
    """Importance weights pi_trainer / pi_sampler correcting the sampler/trainer mismatch (TIS).

    [B, T] inputs -> [B, T] (token modes) or [B, 1] (sequence modes: exp of the summed log-ratio),
    detached. Padding and NaN sampler logprobs give log-ratio 0. *_truncate clamps the ratio to
    [floor, cap]; *_mask sets ratios outside [floor, cap] to 0.
    """
    if mode not in TIS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}: choose one of {TIS_MODES}")
    diff = torch.nan_to_num((logp_trainer - logp_sampler) * mask, nan=0.0)  # [B, T]
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # [B, 1]
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=floor, max=cap)
    return ratio.masked_fill((ratio < floor) | (ratio > cap), 0.0)


@dataclass(frozen=True)
class LossDivisors:
    """The whole mini-batch's counts (over all ranks) a micro-batch's loss is divided by, so that
    the micro-batches' losses and gradients add up to the mini-batch's."""

    num_sequences: float
    num_tokens: float
    max_completion_length: int


def policy_loss(
    logprobs: torch.Tensor,
    old: torch.Tensor | None,
    sampler: torch.Tensor | None,
    ref: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    algo,
    divisors: LossDivisors,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole policy-gradient objective of one micro-batch: clipped ratio, importance weights
    against the sampler, KL to the reference, aggregation. Pure: no model, no process group.

    logprobs [b, T] the trainer's (with gradient); old [b, T] the policy's before this step's
    first update (None: one update per batch, the ratio is exactly 1); sampler [b, T] the rollout
    engine's logprobs (None: no importance correction); ref [b, T] the reference model's (None: no
    KL term); advantages [b]; mask [b, T] loss weights (0 on padding and dropped sequences);
    `algo`: eps_low, eps_high, importance_level, tis_mode, tis_cap, tis_min, kl_beta and
    loss_aggregation as in rlx.config.AlgoConfig.
    Returns (loss, metrics): the metrics are this micro-batch's sums (clip_low, clip_high, kl,
    tis_sum, tis_zero, over its loss tokens) and extremes (tis_min, tis_max, ratio_dev_max).
    """
    old = logprobs.detach() if old is None else old.to(logprobs)
    per_token, low, high = clipped_policy_loss(
        logprobs, old, advantages, mask, algo.eps_low, algo.eps_high, algo.importance_level
    )  # [b, T]
    stats = {
        "clip_low": float((low * mask).sum()),
        "clip_high": float((high * mask).sum()),
        "ratio_dev_max": float(((logprobs.detach() - old).exp() - 1).abs().mul(mask).max()),
    }
    if sampler is not None:
        weights = importance_weights(
            old, sampler, mask, algo.tis_mode, algo.tis_cap, algo.tis_min
        )  # [b, T] or [b, 1]
        per_token = per_token * weights
        real = weights.expand_as(mask)[mask > 0]
        if real.numel():
            stats |= {"tis_sum": float(real.sum()), "tis_zero": float((real == 0).sum())}
            stats |= {"tis_min": float(real.min()), "tis_max": float(real.max())}
    if ref is not None:
        kl = k3_kl(logprobs, ref)  # [b, T]
        per_token = per_token + algo.kl_beta * kl
        stats["kl"] = float((kl.detach() * mask).sum())
    loss = aggregate_loss(
        per_token,
        mask,
        algo.loss_aggregation,
        max_completion_length=divisors.max_completion_length,
        num_sequences=divisors.num_sequences,
        num_tokens=divisors.num_tokens,
    )
    return loss, stats

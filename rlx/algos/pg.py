"""Policy-gradient math shared by GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE(++): pure functions.

Every learner of the family is one choice from each table below; the training loop in
recipes/pg.py calls these and nothing else does the math. Shapes: P prompts, G completions per
prompt, B = P*G sequences, T completion tokens (right-padded), V vocabulary.

    advantages  ADVANTAGES[name](rewards [P, G]) -> [P, G]
    logprobs    token_logprobs(logits [B, T, V], tokens [B, T]) -> [B, T]
    loss        clipped_policy_loss(...) -> per-token loss [B, T]; aggregate_loss(...) -> scalar

Deviations from the papers, on purpose: REINFORCE++ whitens per-sequence rewards weighted by token
count (identical to whitening over all tokens when every token of a sequence shares its advantage,
which holds here because rlx uses no per-token KL reward shaping); the KL to the reference is the k3
estimator added to the loss (GRPO style), not folded into the reward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-6  # guards divisions by a zero std (all-equal groups)


# ----------------------------------------------------------------------------- advantages


def grpo_advantages(rewards: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(r - group mean) / (group std + eps); std is the unbiased one, as in TRL. [P, G] -> [P, G]."""
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - group mean, no division by the std (removes the difficulty bias)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i - mean of the other G-1 rewards of the group = G/(G-1) * (r_i - group mean)."""
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (num_samples >= 2)")
    return g / (g - 1) * (rewards - rewards.mean(dim=1, keepdim=True))


def _whiten(values: torch.Tensor, weights: torch.Tensor | None, eps: float) -> torch.Tensor:
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    mean = (values * w).sum() / w.sum()
    var = ((values - mean) ** 2 * w).sum() / w.sum()
    return (values - mean) / (var.sqrt() + eps)


def reinforce_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """REINFORCE++: rewards whitened over the whole batch (token-weighted when lengths given)."""
    return _whiten(rewards, lengths, eps)


def reinforce_baseline_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the whole batch."""
    return _whiten(dr_grpo_advantages(rewards), lengths, eps)


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce": reinforce_advantages,
    "reinforce_baseline": reinforce_baseline_advantages,
}


def compute_advantages(
    name: str, rewards: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch by name; `lengths` [P, G] only matters for the globally whitened estimators."""
    if name not in ADVANTAGES:
        raise ValueError(
            f"unknown advantage estimator {name!r}: choose one of {sorted(ADVANTAGES)}"
        )
    if name.startswith("reinforce"):
        return ADVANTAGES[name](rewards, lengths)
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
    (GSPO: one ratio per sequence). Returns (per-token loss [B, T], clipped fraction of tokens).
    """
    if level == "token":
        log_ratio = logp - logp_old  # [B, T]
    elif level == "sequence":
        log_ratio = sequence_log_ratio(logp, logp_old, mask)  # [B, 1], gradient through every token
    else:
        raise ValueError(f"importance level must be 'token' or 'sequence', got {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped).expand_as(logp)  # [B, T]
    was_clipped = (clipped < unclipped).expand_as(logp).float()
    clip_fraction = (was_clipped * mask).sum() / mask.sum().clamp(min=1)
    return per_token, clip_fraction


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
    losses (and gradients) add up to the whole batch's.
    """
    masked = per_token * mask  # [B, T]
    sequences = per_token.shape[0] if num_sequences is None else num_sequences
    if mode == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    if mode == "token_mean":
        tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked.sum() / tokens
    if mode == "constant_length":
        if max_completion_length <= 0:
            raise ValueError("constant_length aggregation needs max_completion_length > 0")
        return masked.sum() / (sequences * max_completion_length)
    raise ValueError(
        f"unknown loss aggregation {mode!r}: sequence_mean, token_mean or constant_length"
    )


def weighted_advantages(
    name: str,
    total: torch.Tensor,
    per_fn: torch.Tensor,
    lengths: torch.Tensor,
    weights: list[float],
    normalization: str,
) -> torch.Tensor:
    """[P, G] advantages of several rewards. `total` [P, G] is their weighted sum, `per_fn`
    [P, G, K] each function's reward, `lengths` [P, G] completion lengths. "sum_then_normalize":
    the advantage of the total; "normalize_then_sum": the weighted sum of each reward's own
    advantages. NaN rewards ("not applicable") count as 0."""
    if normalization == "sum_then_normalize":
        return compute_advantages(name, torch.nan_to_num(total), lengths)
    if normalization != "normalize_then_sum":
        raise ValueError(f"unknown reward normalization {normalization!r}")
    adv = torch.zeros_like(total)
    for k, weight in enumerate(weights):
        adv += weight * compute_advantages(name, torch.nan_to_num(per_fn[..., k]), lengths)
    return adv


def groups_to_keep(total: torch.Tensor, dynamic_sampling: bool) -> torch.Tensor:
    """[P] bool: groups with a reward for every sample and, with dynamic sampling (DAPO), whose
    rewards are not all equal (such a group has zero advantage everywhere). One-sample groups
    (REINFORCE++ with num_samples=1) have no spread to test and are kept."""
    keep = torch.isfinite(total).all(dim=1)
    if dynamic_sampling and total.shape[1] > 1:
        keep &= (total.max(dim=1).values - total.min(dim=1).values) > 1e-9
    return keep


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
"""Advantage estimators that compare a sample with the others of its group (need G >= 2)."""


def kept_advantages(
    name: str,
    total: torch.Tensor,
    per_fn: torch.Tensor,
    lengths: torch.Tensor,
    weights: list[float],
    normalization: str,
    dynamic_sampling: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [P, G], keep [P]): which groups train, then their advantages computed over the
    kept groups only (filter first, then normalise, as verl's DAPO does), 0 for dropped groups.
    The order matters for the batch-whitened estimators (reinforce, reinforce_baseline)."""
    keep = groups_to_keep(total, dynamic_sampling)  # [P]
    advantages = torch.zeros_like(total)  # [P, G]
    if keep.any():
        advantages[keep] = weighted_advantages(
            name, total[keep], per_fn[keep], lengths[keep], weights, normalization
        )
    return advantages, keep


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def truncated_is_weights(
    logp_trainer: torch.Tensor, logp_sampler: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """TIS: min(exp(logp_trainer - logp_sampler), cap), detached. Corrects vLLM/trainer mismatch."""
    return torch.exp(logp_trainer - logp_sampler).clamp(max=cap).detach()

"""The shared policy-gradient math against hand-computed values, and against TRL's GRPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algos import pg
from rlx.config import AlgoConfig
from rlx.config.choices import GROUP_ESTIMATORS


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(
        pg.grpo_advantages(r), torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (s + pg.EPS)
    )
    assert torch.allclose(pg.dr_grpo_advantages(r), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    # RLOO: r_0 - mean(0, 0, 1) = 2/3
    assert torch.allclose(pg.rloo_advantages(r), torch.tensor([[2, -2, -2, 2]]) / 3)


def test_all_equal_group_has_zero_advantage():
    r = torch.tensor([[0.7, 0.7, 0.7]])
    for name in ("grpo", "dr_grpo", "rloo"):
        assert torch.equal(pg.compute_advantages(name, r), torch.zeros_like(r))


def test_constant_groups_get_exactly_zero_advantage():
    """8 rewards of 0.99: their float32 mean is 1 ulp off, and (r - mean) / (std + eps) gave all
    8 the same positive advantage (0.106 with eps 1e-6). A group of equal rewards gets 0."""
    r = torch.tensor([[0.99] * 8, [0.0, 1.0] * 4])
    for name in GROUP_ESTIMATORS:
        adv = pg.compute_advantages(name, r, torch.ones_like(r))
        assert torch.equal(adv[0], torch.zeros(8)), name
        assert adv[1].abs().min() > 0.4, name
    adv = pg.compute_advantages("grpo", r, scale_rewards="batch")
    assert torch.equal(adv[0], torch.zeros(8)) and adv[1].abs().min() > 0.4
    # reinforce has no group baseline: only a batch of equal rewards is constant
    assert torch.equal(pg.compute_advantages("reinforce", r[:1]), torch.zeros(1, 8))
    # GDPO: a reward constant within a group adds 0 there, not a same-sign shift
    per_fn = torch.stack([r, torch.full_like(r, 0.99)], -1)  # [2, 8, 2]
    total = per_fn.sum(-1)
    adv = pg.weighted_advantages(
        "grpo", total, per_fn, torch.ones_like(r), [1.0, 1.0], "normalize_then_sum"
    )
    assert torch.equal(adv[0], torch.zeros(8))
    assert (adv[1] * torch.tensor([-1.0, 1.0] * 4) > 1).all()  # batch std counts group 0's zeros


def test_constant_group_differs_from_trl_on_purpose():
    """TRL's formula (eps 1e-4) gives the 0.99 group a small same-sign advantage from the rounded
    mean; rlx gives exactly 0. Where no such rounding happens the two agree (the tests below)."""
    r = torch.full((1, 8), 0.99)
    trl = _trl_advantages(r.view(-1, 1), torch.tensor([1.0]), 8, "sum_then_normalize", "group")
    assert (trl > 1e-4).all()
    assert torch.equal(pg.grpo_advantages(r, 1e-4), torch.zeros(1, 8))


def test_default_eps_is_trls():
    """The default eps of the std normalisation is TRL's 1e-4: with a small reward spread (std
    5.8e-4) it matters, and the defaults agree with TRL's formula."""
    r = torch.tensor([[0.0, 1e-3, 0.0, 1e-3]])
    trl = _trl_advantages(r.view(-1, 1), torch.tensor([1.0]), 4, "sum_then_normalize", "group")
    assert torch.allclose(pg.compute_advantages("grpo", r), trl.view(1, 4), rtol=0, atol=1e-6)


def test_reinforce_whitening_hand_computed():
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # mean 0.25, population std sqrt(0.1875)
    std = math.sqrt(0.1875)
    expected = (r - 0.25) / (std + pg.WHITEN_EPS)
    assert torch.allclose(pg.reinforce_advantages(r), expected)
    # baseline: centred per group [[.5, -.5], [0, 0]], then whitened: std sqrt(0.125)
    expected = torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / (math.sqrt(0.125) + pg.WHITEN_EPS)
    assert torch.allclose(pg.reinforce_baseline_advantages(r), expected)


def test_reinforce_token_weighted_whitening():
    r = torch.tensor([[1.0, 0.0]])
    lengths = torch.tensor([[3.0, 1.0]])  # as if the 4 tokens had rewards 1, 1, 1, 0
    mean, std = 0.75, math.sqrt(0.1875)
    expected = (r - mean) / (std + pg.WHITEN_EPS)
    assert torch.allclose(pg.compute_advantages("reinforce", r, lengths), expected)


def test_unknown_estimator_and_rloo_group_of_one():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        pg.compute_advantages("ppo", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least 2"):
        pg.rloo_advantages(torch.zeros(3, 1))


def test_token_logprobs_and_entropy_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
        got = pg.token_logprobs(logits, tokens, temperature)
        assert torch.allclose(got, ref, atol=1e-6)
        p = torch.softmax(logits / temperature, -1)
        ent = -(p * torch.log(p)).sum(-1)
        assert torch.allclose(pg.token_entropy(logits, temperature), ent, atol=1e-5)
    # gradients equal the reference's too
    g1 = torch.autograd.grad(pg.token_logprobs(logits, tokens).sum(), logits)[0]
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).sum()
    g2 = torch.autograd.grad(ref, logits)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_clipped_loss_hand_computed():
    logp = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, low, high = pg.clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    ratio = math.exp(0.5)
    # A > 0: the ratio is capped at 1 + eps_high; A < 0: the unclipped (larger) loss is kept
    assert loss[0, 0].item() == pytest.approx(-1.28)
    assert loss[1, 0].item() == pytest.approx(ratio)
    assert high.tolist() == [[1, 0], [0, 0]] and low.tolist() == [[0, 0], [0, 0]]
    # below 1 - eps_low with A < 0: clipped
    loss, low, high = pg.clipped_policy_loss(
        torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.28
    )
    assert loss.item() == pytest.approx(0.8) and low.item() == 1.0 and high.item() == 0.0


def test_gspo_uses_one_sequence_ratio():
    logp = torch.tensor([[0.2, 0.4, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the padded 9.0 must not count
    loss, _, _ = pg.clipped_policy_loss(
        logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, 1.0, 1.0, level="sequence"
    )
    assert torch.allclose(loss, torch.full((1, 3), -math.exp(0.3)))
    (grad,) = torch.autograd.grad(pg.aggregate_loss(loss, mask, "sequence_mean"), logp)
    assert grad[0, 2] == 0 and grad[0, 0] == grad[0, 1]


def test_loss_aggregation_modes():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert pg.aggregate_loss(per_token, mask, "sequence_mean").item() == pytest.approx(3.0)
    assert pg.aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(2.5)
    assert pg.aggregate_loss(per_token, mask, "constant_length", 4).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="max_completion_length"):
        pg.aggregate_loss(per_token, mask, "constant_length")


def test_k3_kl_and_tis():
    kl = pg.k3_kl(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1) and kl[1].item() == 0
    w = pg.importance_weights(
        torch.tensor([[0.0, 2.0, -1.0]]), torch.zeros(1, 3), torch.ones(1, 3), "token_truncate", 2.0
    )
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, math.exp(-1)]]))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
def test_matches_trl_grpo_loss(tiny_llama, tmp_path, loss_type):
    """TRL's GRPOTrainer._compute_loss and rlx's functions give the same loss on the same batch."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    max_len = 6
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        loss_type=loss_type,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=max_len,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        use_bias_correction_kl=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop normally
    torch.manual_seed(0)
    b, tp = 4, 5
    prompt_ids = torch.randint(3, 400, (b, tp))
    completion_ids = torch.randint(3, 400, (b, max_len))
    completion_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    old = torch.randn(b, max_len) * 0.1 - 3
    ref = torch.randn(b, max_len) * 0.1 - 3
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0])
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones(b, tp, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    trl_loss = trainer._compute_loss(trainer.model, inputs)

    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, tp - 1 : -1]
    logp = pg.token_logprobs(logits, completion_ids)
    mask = completion_mask.float()
    modes = {"grpo": "sequence_mean", "dr_grpo": "constant_length", "bnpo": "token_mean"}
    mode = modes.get(loss_type, "token_mean")  # dapo: token mean over the whole batch
    algo = AlgoConfig(loss_aggregation=mode, kl_beta=0.04, eps_low=0.2, eps_high=0.28, tis_cap=0)
    divisors = pg.LossDivisors(float(b), float(mask.sum()), max_len)
    ours, _ = pg.policy_loss(logp, old, None, ref, adv, mask, algo, divisors)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)


def test_weighted_advantages_both_normalisations():
    per_fn = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # one group of 2, two reward functions
    total, lengths = 0.5 * per_fn[..., 0] + 0.5 * per_fn[..., 1], torch.ones(1, 2)
    got = pg.weighted_advantages(
        "dr_grpo", total, per_fn, lengths, [0.5, 0.5], "sum_then_normalize"
    )
    assert torch.allclose(got, torch.tensor([[0.25, -0.25]]))
    # function 1: (r - mean) / std = +-0.5 / sqrt(0.5) (unbiased std of [1, 0]); function 2: 0;
    # weighted sum +-a, a = 0.5 * 0.5 / sqrt(0.5), re-normalised over the batch: std a * sqrt(2)
    got = pg.weighted_advantages("grpo", total, per_fn, lengths, [0.5, 0.5], "normalize_then_sum")
    a = 0.5 * 0.5 / (0.5**0.5 + pg.EPS)
    assert torch.allclose(got, torch.tensor([[a, -a]]) / (a * 2**0.5 + pg.EPS))


def test_groups_to_keep_drops_missing_and_all_equal_groups():
    total = torch.tensor([[1.0, 0.0], [1.0, 1.0], [float("nan"), 1.0]])
    assert pg.groups_to_keep(total, dynamic_sampling=True).tolist() == [True, False, False]
    assert pg.groups_to_keep(total, dynamic_sampling=False).tolist() == [True, True, False]


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "constant_length"])
def test_a_fully_masked_mini_batch_contributes_exactly_zero(mode):
    """mask_truncated_completions can mask every sequence of a mini-batch: the loop then passes
    the whole mini-batch's counts, 0 sequences (and 0 tokens). No 0 / 0: the loss is exactly 0 and
    its gradient a finite zero."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 5, generator=gen, requires_grad=True)
    logp = torch.log_softmax(theta, -1)
    per_token, _, _ = pg.clipped_policy_loss(logp, logp.detach(), torch.randn(4), torch.zeros(4, 5))
    mask = torch.zeros(4, 5)
    for tokens in (0.0, 1.0):  # the loop clamps the token count to 1; 0 must be safe too
        loss = pg.aggregate_loss(per_token, mask, mode, 5, num_sequences=0.0, num_tokens=tokens)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), tokens
    assert pg.aggregate_loss(per_token, mask, mode, 5).item() == 0.0  # its own counts


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "constant_length"])
def test_micro_batching_changes_nothing(mode):
    """The loop's reduction: the gradient of one batch in 1, 2 or 4 micro-batches (each passing
    the whole batch's divisors to aggregate_loss) is the gradient of the batch, to 1e-6 (fp32)."""
    gen = torch.Generator().manual_seed(0)
    b, t, max_len = 8, 6, 7
    theta = torch.randn(b, t, generator=gen, requires_grad=True)  # stands in for the weights
    adv = torch.randn(b, generator=gen)
    mask = (torch.rand(b, t, generator=gen) > 0.3).float()
    mask[:, 0] = 1  # every sequence has a token

    def gradient(parts: int) -> torch.Tensor:
        theta.grad = None
        tokens = float(mask.sum())
        for rows in torch.arange(b).chunk(parts):
            logp = torch.log_softmax(theta[rows], -1)  # [b/parts, T]
            per_token, _, _ = pg.clipped_policy_loss(logp, logp.detach(), adv[rows], mask[rows])
            loss = pg.aggregate_loss(
                per_token, mask[rows], mode, max_len, num_sequences=b, num_tokens=tokens
            )
            loss.backward()
        return theta.grad.clone()

    whole = gradient(1)
    logp = torch.log_softmax(theta, -1)
    reference = torch.autograd.grad(
        pg.aggregate_loss(
            pg.clipped_policy_loss(logp, logp.detach(), adv, mask)[0], mask, mode, max_len
        ),
        theta,
    )[0]  # the batch in one piece with the default (its own) divisors
    assert torch.allclose(whole, reference, atol=1e-6)
    for parts in (2, 4):
        assert torch.allclose(gradient(parts), whole, atol=1e-6), parts


@pytest.mark.parametrize("name", ["reinforce", "reinforce_baseline"])
def test_batch_whitening_sees_only_the_kept_groups(name):
    """Filter, then normalise: the kept advantages have mean 0 and std 1 although the dropped
    (all-equal) groups have a very different mean."""
    kept = torch.tensor([[3.0, 0.0, 1.0, 2.0], [5.0, 9.0, 1.0, 6.0], [0.0, 4.0, 4.0, 8.0]])
    dropped = torch.full((3, 4), 20.0)  # all equal: dynamic sampling drops them
    total = torch.cat([kept, dropped])
    per_fn, lengths = total[..., None], torch.ones_like(total)
    adv, keep = pg.kept_advantages(name, total, per_fn, lengths, [1.0], "sum_then_normalize", True)
    assert keep.tolist() == [True] * 3 + [False] * 3
    a = adv[keep]
    assert abs(a.mean().item()) < 1e-6 and abs(a.std(unbiased=False).item() - 1) < 1e-6
    assert torch.equal(adv[~keep], torch.zeros(3, 4))


def test_pg_config_refuses_one_sample_groups_and_truncated_sampling():
    from rlx.config import ConfigError, PGConfig, load_config

    total = torch.tensor([[1.0], [0.0], [float("nan")]])  # G = 1: nothing to compare within a group
    assert pg.groups_to_keep(total, dynamic_sampling=True).tolist() == [True, True, False]
    adv, keep = pg.kept_advantages(
        "reinforce",
        total,
        total[..., None],
        torch.ones_like(total),
        [1.0],
        "sum_then_normalize",
        True,
    )
    assert keep.tolist() == [True, True, False] and adv[:2, 0].tolist() == pytest.approx(
        [1, -1], abs=1e-5
    )
    load_config(PGConfig, overrides=["algo.learner=reinforce", "rollout.num_samples=1"])
    for knob in ("rollout.top_p=0.9", "rollout.top_k=20"):  # truncated sampling: refused
        with pytest.raises(ConfigError, match="training samples from the full distribution"):
            load_config(PGConfig, overrides=[knob])
    for name in GROUP_ESTIMATORS:
        with pytest.raises(
            ConfigError, match="rollout.num_samples must be >= 2 for algo.learner"
        ):
            load_config(PGConfig, overrides=[f"algo.learner={name}", "rollout.num_samples=1"])


def test_clip_indicators_hand_computed():
    """low: ratio < 1 - eps_low with A < 0; high: ratio > 1 + eps_high with A > 0; not masked."""
    log_ratio = torch.tensor(
        [
            [0.3, 0.2, -0.5],  # A > 0: 1.35 > 1.28 high; 1.22 inside; 0.61 below but A > 0
            [-0.3, 0.5, -1.0],  # A < 0: 0.74 < 0.8 low; 1.65 above but A < 0; padded 0.37 low
            [2.0, -2.0, 0.0],  # A = 0: never clipped
        ]
    )
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp = log_ratio.clone().requires_grad_()
    adv = torch.tensor([1.0, -1.0, 0.0])
    _, low, high = pg.clipped_policy_loss(logp, torch.zeros(3, 3), adv, mask, 0.2, 0.28)
    assert low.dtype == high.dtype == torch.float32 and not low.requires_grad
    assert low.tolist() == [[0, 0, 0], [1, 0, 1], [0, 0, 0]]
    assert high.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    # sequence level: the [B, 1] ratio of the masked mean log-ratio, broadcast to [B, T]
    log_ratio = torch.tensor([[0.3, 0.5, 9.0], [-0.2, -0.4, -0.3]])  # means 0.4 and -0.3
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    _, low, high = pg.clipped_policy_loss(
        log_ratio, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, 0.2, 0.28, "sequence"
    )  # exp(0.4) = 1.49 > 1.28 with A > 0; exp(-0.3) = 0.74 < 0.8 with A < 0
    assert high.tolist() == [[1, 1, 1], [0, 0, 0]] and low.tolist() == [[0, 0, 0], [1, 1, 1]]


def _trl_importance_weights(old_per_token_logps, sampling_per_token_logps, mask, mode, lo, hi):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, trl/trainer/grpo_trainer.py lines
    2662-2703, reproduced as the reference (self.* replaced by the arguments)."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
        logps_diff = per_sequence_logps_diff
    else:
        logps_diff = per_token_logps_diff
    vllm_importance_sampling_ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        vllm_importance_sampling_ratio = torch.clamp(vllm_importance_sampling_ratio, min=lo, max=hi)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = lo if lo is not None else -math.inf
        max_val = hi if hi is not None else math.inf
        invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | (
            vllm_importance_sampling_ratio > max_val
        )
        vllm_importance_sampling_ratio = vllm_importance_sampling_ratio.masked_fill(
            invalid_mis_mask, value=0.0
        )
    return vllm_importance_sampling_ratio


@pytest.mark.parametrize("mode", pg.TIS_MODES)
def test_importance_weights_match_trl(mode):
    nan = float("nan")
    sampler = torch.tensor(
        [[-1.0, -2.0, -3.0, -4.0], [-1.0, nan, -1.0, -1.0], [-2.0, -2.0, nan, nan]]
    )
    # log-ratios: row 0 [1.0 (e > cap), -0.1, -3.0 (below floor), pad 4.0]: sum -2.1 < log 0.2
    # row 1 [0.2, NaN sampler, 0.3, 0.1]: sum 0.6; row 2 [0.5, 0.4, pad, pad]: sum 0.9 > log 2
    trainer = sampler.nan_to_num(-1.0) + torch.tensor(
        [[1.0, -0.1, -3.0, 4.0], [0.2, 0.0, 0.3, 0.1], [0.5, 0.4, 0.0, 0.0]]
    )
    trainer.requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])  # long, as TRL's
    got = pg.importance_weights(trainer, sampler, mask, mode, cap=2.0, floor=0.2)
    ref = _trl_importance_weights(trainer.detach(), sampler, mask, mode, 0.2, 2.0)
    assert got.shape == ((3, 1) if mode.startswith("sequence") else (3, 4))
    assert not got.requires_grad
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    assert (got == 0).any() if mode.endswith("mask") else (got == 2.0).any()
    # floor 0 is TRL's clip_min=None: no lower bound
    got = pg.importance_weights(trainer, sampler, mask, mode, cap=2.0)
    ref = _trl_importance_weights(trainer.detach(), sampler, mask, mode, None, 2.0)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_importance_weights_unknown_mode():
    with pytest.raises(ValueError, match="token_truncate.*sequence_mask"):
        pg.importance_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "token")


def test_nanstd_matches_trl():
    from trl.trainer.utils import nanstd

    nan = float("nan")
    x = torch.tensor([[1.0, nan, 3.0, 4.0], [nan, nan, 2.0, nan], [nan] * 4, [0.5, 0.5, 1.0, 2.0]])
    assert torch.allclose(pg._nanstd(x), nanstd(x), atol=1e-6)
    for dim in (0, 1):
        for keepdim in (False, True):
            got, ref = pg._nanstd(x, dim, keepdim), nanstd(x, dim=dim, keepdim=keepdim)
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-6, equal_nan=True)


def _trl_advantages(rewards_per_func, reward_weights, num_generations, aggregation, scale_rewards):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, trl/trainer/grpo_trainer.py lines
    2759-2810 (logging dropped), reproduced as the reference. [P*G, K] -> [P*G]."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards == "group":
            if num_generations > 1:
                std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            if rewards.numel() > 1:
                std_rewards = nanstd(rewards).expand_as(rewards)
            else:
                std_rewards = torch.zeros_like(rewards)
        advantages = rewards - mean_grouped_rewards
        advantages = advantages / (std_rewards + 1e-4)
    elif aggregation == "normalize_then_sum":
        k = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, num_generations, k)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = (
            nanstd(grouped, dim=1, keepdim=True)
            if num_generations > 1
            else torch.zeros_like(mean_k)
        )
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, k)
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = (
            nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        )
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _total(per_fn: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The caller's total (rlx/rewards.py): weighted nansum, NaN when no reward applies."""
    total = (per_fn * torch.tensor(weights)).nansum(-1)
    total[per_fn.isnan().all(-1)] = float("nan")
    return total


def _gdpo_batch() -> tuple[torch.Tensor, list[float]]:
    """[4, 4, 3] rewards with None (NaN) values, and weights."""
    nan = float("nan")
    per_fn = torch.tensor(
        [
            [[0.9, 1.0, 0.2], [0.1, 0.0, nan], [0.5, 1.0, 0.7], [0.3, 0.0, 0.1]],
            # constant weighted total 1.5, varying individual rewards
            [[1.0, 0.0, 0.25], [0.0, 2.0, 0.25], [1.0, 0.0, 0.25], [0.0, 2.0, 0.25]],
            # an unscorable sample; reward 1 applies to one sample only (its std is NaN)
            [[nan, nan, nan], [0.4, 3.0, 1.0], [0.8, nan, 0.0], [0.6, nan, 1.0]],
            # reward 2 never applies in this group
            [[1.0, 1.0, nan], [0.0, 1.0, nan], [1.0, 0.0, nan], [0.0, 0.0, nan]],
        ]
    )
    return per_fn, [1.0, 0.5, 2.0]


def test_normalize_then_sum_matches_trl():
    per_fn, weights = _gdpo_batch()
    p, g, k = per_fn.shape
    total, lengths = _total(per_fn, weights), torch.ones(p, g)
    assert torch.allclose(total[1], torch.full((g,), 1.5))
    got = pg.weighted_advantages(
        "grpo", total, per_fn, lengths, weights, "normalize_then_sum", eps=1e-4
    )
    ref = _trl_advantages(
        per_fn.view(-1, k), torch.tensor(weights), g, "normalize_then_sum", "group"
    )
    assert torch.allclose(got, ref.view(p, g), rtol=0, atol=1e-6)
    assert got[2, 0] == 0 and got[1].abs().min() > 0.1  # unscorable: 0; constant total: not 0
    # one sample per prompt: TRL's std is 0 there
    one = per_fn[0, :, None]  # [4, 1, 3]
    got = pg.weighted_advantages(
        "grpo", _total(one, weights), one, torch.ones(4, 1), weights, "normalize_then_sum", 1e-4
    )
    ref = _trl_advantages(one.view(-1, k), torch.tensor(weights), 1, "normalize_then_sum", "group")
    assert torch.allclose(got, ref.view(4, 1), rtol=0, atol=1e-6)


def test_groups_to_keep_with_per_reward_spread():
    nan = float("nan")
    per_fn = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],  # constant total, varying rewards: kept
            [[1.0, nan], [1.0, 2.0], [1.0, 2.0]],  # totals vary, every reward constant: dropped
            [[nan, nan], [0.0, 1.0], [1.0, 0.0]],  # a sample with no reward: dropped
            [[nan, 1.0], [3.0, 1.0], [nan, 1.0]],  # one value of reward 0 only: dropped
            [[0.0, 1.0], [0.0, 2.0], [0.0, 1.0]],  # reward 1 varies: kept
        ]
    )
    total = _total(per_fn, [1.0, 1.0])
    assert pg.groups_to_keep(total, True, per_fn).tolist() == [True, False, False, False, True]
    assert pg.groups_to_keep(total, True).tolist() == [False, True, False, True, True]
    assert pg.groups_to_keep(total, False, per_fn).tolist() == [True, True, False, True, True]
    # kept_advantages passes per_fn for normalize_then_sum: the GDPO batch keeps groups 0, 1, 3
    per_fn, weights = _gdpo_batch()
    p, g, k = per_fn.shape
    total, lengths = _total(per_fn, weights), torch.ones(p, g)
    adv, keep = pg.kept_advantages(
        "grpo", total, per_fn, lengths, weights, "normalize_then_sum", True, eps=1e-4
    )
    assert keep.tolist() == [True, True, False, True]
    kept = per_fn[keep]
    ref = _trl_advantages(kept.reshape(-1, k), torch.tensor(weights), g, "normalize_then_sum", "")
    assert torch.allclose(adv[keep], ref.view(-1, g), rtol=0, atol=1e-6)
    assert torch.equal(adv[~keep], torch.zeros(1, g))
    _, keep = pg.kept_advantages(
        "grpo", total, per_fn, lengths, weights, "sum_then_normalize", True
    )  # the total of group 1 is constant: dropped
    assert keep.tolist() == [True, False, False, True]


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_grpo_reward_scaling_matches_trl(scale):
    nan = float("nan")
    per_fn = torch.tensor(
        [
            [[1.0, 0.5], [0.0, nan], [1.0, 0.0], [0.0, 1.0]],
            [[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [3.0, 0.0]],  # all equal: std 0
            [[0.2, nan], [0.7, 2.0], [nan, 4.0], [0.1, 0.3]],
        ]
    )
    weights = [1.0, 0.5]
    p, g, k = per_fn.shape
    total, lengths = _total(per_fn, weights), torch.ones(p, g)
    ref = _trl_advantages(per_fn.view(-1, k), torch.tensor(weights), g, "sum_then_normalize", scale)
    ref = ref.view(p, g)
    assert torch.allclose(pg.grpo_advantages(total, 1e-4, scale), ref, rtol=0, atol=1e-6)
    got = pg.compute_advantages("grpo", total, scale_rewards=scale, eps=1e-4)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    got = pg.weighted_advantages(
        "grpo", total, per_fn, lengths, weights, "sum_then_normalize", 1e-4, scale_rewards=scale
    )
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    got, keep = pg.kept_advantages(
        "grpo",
        total,
        per_fn,
        lengths,
        weights,
        "sum_then_normalize",
        False,
        1e-4,
        scale_rewards=scale,
    )
    assert keep.all() and torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_advantage_options_refused():
    total, per_fn, lengths = torch.zeros(1, 2), torch.zeros(1, 2, 1), torch.ones(1, 2)
    for name in ("dr_grpo", "rloo", "reinforce", "reinforce_baseline"):
        with pytest.raises(ValueError, match="scale_rewards='batch' is defined for learner=grpo"):
            pg.compute_advantages(name, total, lengths, scale_rewards="batch")
        with pytest.raises(ValueError, match="normalize_then_sum is defined for learner=grpo"):
            pg.weighted_advantages(name, total, per_fn, lengths, [1.0], "normalize_then_sum")
        with pytest.raises(ValueError, match="normalize_then_sum is defined for learner=grpo"):
            pg.kept_advantages(name, total, per_fn, lengths, [1.0], "normalize_then_sum", True)
        with pytest.raises(ValueError, match="scale_rewards='batch' is defined for learner=grpo"):
            pg.kept_advantages(
                name,
                total,
                per_fn,
                lengths,
                [1.0],
                "sum_then_normalize",
                True,
                scale_rewards="batch",
            )
    with pytest.raises(ValueError, match="unknown scale_rewards"):
        pg.compute_advantages("grpo", total, scale_rewards="none")
    with pytest.raises(ValueError, match="unknown reward normalization"):
        pg.weighted_advantages("grpo", total, per_fn, lengths, [1.0], "sum")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["algo.learner=rloo", "algo.scale_rewards=batch"], "scale_rewards must be"),
        (["algo.learner=rloo", "algo.reward_normalization=normalize_then_sum"], "reward_norm"),
        (["algo.tis_min=1.5"], "tis_min must be in"),
        (["algo.ppo_epochs=0"], "ppo_epochs must be >= 1"),
        (["algo.mini_batches=0"], "mini_batches must be >= 1"),
        (["algo.tis_mode=sequence_clip"], "tis_mode"),
    ],
)
def test_pg_config_refuses_bad_learner_knobs(overrides, message):
    from rlx.config import ConfigError, PGConfig, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(PGConfig, overrides=overrides)
    load_config(PGConfig, overrides=["algo.scale_rewards=batch", "algo.tis_mode=sequence_mask"])


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_policy_loss_composes_ratio_importance_weights_and_kl(mode):
    """policy_loss = aggregate(clipped loss x importance weights + beta x k3 KL), its metrics the
    masked sums and extremes of the pieces."""
    torch.manual_seed(0)
    logp = (torch.randn(3, 4) * 0.3 - 1).requires_grad_()
    old, sampler, ref = (logp.detach() + torch.randn(3, 4) * 0.2 for _ in range(3))
    adv, mask = torch.tensor([1.0, -0.5, 0.8]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1] * 4])
    mask = mask.float()
    algo = AlgoConfig(tis_mode=mode, tis_cap=1.5, kl_beta=0.1, loss_aggregation="token_mean")
    divisors = pg.LossDivisors(6.0, 20.0, 4)  # a micro-batch of a larger mini-batch
    loss, stats = pg.policy_loss(logp, old, sampler, ref, adv, mask, algo, divisors)

    per_token, low, high = pg.clipped_policy_loss(logp, old, adv, mask, 0.2, algo.eps_high)
    weights = pg.importance_weights(old, sampler, mask, mode, 1.5, 0.0)
    kl = pg.k3_kl(logp, ref)
    expected = ((per_token * weights + 0.1 * kl) * mask).sum() / 20.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    real = weights.expand_as(mask)[mask > 0]
    assert stats["tis_max"] == pytest.approx(real.max().item()) and stats["tis_max"] <= 1.5
    assert stats["kl"] == pytest.approx((kl.detach() * mask).sum().item(), rel=1e-6)
    assert stats["clip_low"] == (low * mask).sum().item()
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    # without a sampler, reference or old policy: no correction, no KL, ratio exactly 1
    bare, bare_stats = pg.policy_loss(logp, None, None, None, adv, mask, algo, divisors)
    assert "tis_max" not in bare_stats and "kl" not in bare_stats
    assert bare_stats["ratio_dev_max"] == 0.0
    assert bare.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / 20.0, rel=1e-6)

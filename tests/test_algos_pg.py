"""The shared policy-gradient math against hand-computed values, and against TRL's GRPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algos import pg


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


def test_reinforce_whitening_hand_computed():
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # mean 0.25, population std sqrt(0.1875)
    std = math.sqrt(0.1875)
    expected = (r - 0.25) / (std + pg.EPS)
    assert torch.allclose(pg.reinforce_advantages(r), expected)
    # baseline: centred per group [[.5, -.5], [0, 0]], then whitened: std sqrt(0.125)
    expected = torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / (math.sqrt(0.125) + pg.EPS)
    assert torch.allclose(pg.reinforce_baseline_advantages(r), expected)


def test_reinforce_token_weighted_whitening():
    r = torch.tensor([[1.0, 0.0]])
    lengths = torch.tensor([[3.0, 1.0]])  # as if the 4 tokens had rewards 1, 1, 1, 0
    mean, std = 0.75, math.sqrt(0.1875)
    expected = (r - mean) / (std + pg.EPS)
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
    loss, clip_frac = pg.clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    ratio = math.exp(0.5)
    # A > 0: the ratio is capped at 1 + eps_high; A < 0: the unclipped (larger) loss is kept
    assert loss[0, 0].item() == pytest.approx(-1.28)
    assert loss[1, 0].item() == pytest.approx(ratio)
    assert clip_frac.item() == pytest.approx(0.5)
    # below 1 - eps_low with A < 0: clipped
    loss, clip_frac = pg.clipped_policy_loss(
        torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.28
    )
    assert loss.item() == pytest.approx(0.8) and clip_frac.item() == 1.0


def test_gspo_uses_one_sequence_ratio():
    logp = torch.tensor([[0.2, 0.4, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the padded 9.0 must not count
    loss, _ = pg.clipped_policy_loss(
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
    w = pg.truncated_is_weights(torch.tensor([0.0, 2.0, -1.0]), torch.zeros(3), cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, math.exp(-1)]))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
def test_matches_trl_grpo_loss(tiny_llama, tmp_path, loss_type):
    """TRL's GRPOTrainer._compute_loss and rlx's functions give the same loss on the same batch."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    max_len = 6
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], loss_type=loss_type,
        num_generations=2, per_device_train_batch_size=4, max_completion_length=max_len,
        beta=0.04, epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=False,
    )  # fmt: skip
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
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones(b, tp, dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }  # fmt: skip
    trl_loss = trainer._compute_loss(trainer.model, inputs)

    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, tp - 1 : -1]
    logp = pg.token_logprobs(logits, completion_ids)
    mask = completion_mask.float()
    per_token, _ = pg.clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    per_token = per_token + 0.04 * pg.k3_kl(logp, ref)
    modes = {"grpo": "sequence_mean", "dr_grpo": "constant_length", "bnpo": "token_mean"}
    mode = modes.get(loss_type, "token_mean")  # dapo: token mean over the whole batch
    ours = pg.aggregate_loss(per_token, mask, mode, max_len)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)


def test_weighted_advantages_both_normalisations():
    per_fn = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # one group of 2, two reward functions
    total, lengths = 0.5 * per_fn[..., 0] + 0.5 * per_fn[..., 1], torch.ones(1, 2)
    got = pg.weighted_advantages(
        "dr_grpo", total, per_fn, lengths, [0.5, 0.5], "sum_then_normalize"
    )
    assert torch.allclose(got, torch.tensor([[0.25, -0.25]]))
    # function 1: (r - mean) / std = +-0.5 / sqrt(0.5) (unbiased std of [1, 0]); function 2: 0
    got = pg.weighted_advantages("grpo", total, per_fn, lengths, [0.5, 0.5], "normalize_then_sum")
    assert torch.allclose(got, 0.5 * torch.tensor([[0.5, -0.5]]) / (0.5**0.5 + 1e-6))


def test_groups_to_keep_drops_missing_and_all_equal_groups():
    total = torch.tensor([[1.0, 0.0], [1.0, 1.0], [float("nan"), 1.0]])
    assert pg.groups_to_keep(total, dynamic_sampling=True).tolist() == [True, False, False]
    assert pg.groups_to_keep(total, dynamic_sampling=False).tolist() == [True, True, False]


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
            per_token, _ = pg.clipped_policy_loss(logp, logp.detach(), adv[rows], mask[rows])
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
    from rlx.config import ConfigError, load_config
    from rlx.train_config import PGConfig

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
    load_config(PGConfig, overrides=["algo.advantage=reinforce", "rollout.num_samples=1"])
    for knob in ("rollout.top_p=0.9", "rollout.top_k=20"):  # truncated sampling: refused
        with pytest.raises(ConfigError, match="training samples from the full distribution"):
            load_config(PGConfig, overrides=[knob])
    for name in pg.GROUP_ESTIMATORS:
        with pytest.raises(
            ConfigError, match="rollout.num_samples must be >= 2 for algo.advantage"
        ):
            load_config(PGConfig, overrides=[f"algo.advantage={name}", "rollout.num_samples=1"])

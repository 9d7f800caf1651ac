"""GRPO math on hand-built tensors (tier 1): the loss against arithmetic done by hand, advantages on
crafted groups, token logprobs against the naive computation, the config's invariants."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from speechrl.services.config import add_arguments, from_mapping, from_namespace
from speechrl.trainer.core.advantages import group_advantages, reward_statistics, weighted_rewards
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.losses import (
    KL_ESTIMATORS,
    LossInputs,
    grpo_loss,
    normalizer,
    token_entropy,
    token_logprobs,
)
from speechrl.trainer.core.objectives import LOSSES

log = math.log


def config(**overrides: object) -> GRPOConfig:
    values: dict = {"batch_size": 2, "group_size": 2, "mini_batch_size": 4, "clip_epsilon": 0.2, "kl_beta": 0.1,
                    "max_completion_length": 2}
    return GRPOConfig(**{**values, **overrides})


# Two groups of two samples, two completion tokens each (samples 1 and 3 have one token, then padding).
# Advantages: Dr. GRPO on rewards [3, 1] and [1.5, 0.5] -> r - mean = [1, -1] and [0.5, -0.5].
#
#   token   A     pi      pi_old  pi_ref  ratio  clipped [0.8, 1.2]  surrogate min(r A, clip(r) A)  k3 KL
#   s0 t0  +1    0.6     0.4     0.3     1.5    1.2                 min(1.5, 1.2)   =  1.2  (clip)  0.5 - ln 0.5 - 1 = 0.193147
#   s0 t1  +1    0.5     0.5     0.5     1.0    1.0                 1.0                             0
#   s1 t0  -1    0.2     0.4     0.4     0.5    0.8                 min(-0.5, -0.8) = -0.8  (clip)  2 - ln 2 - 1     = 0.306853
#   s2 t0  +0.5  0.33    0.3     0.33    1.1    1.1                 0.55                            0
#   s2 t1  +0.5  0.9     0.9     0.9     1.0    1.0                 0.5                             0
#   s3 t0  -0.5  0.6     0.4     0.6     1.5    1.2                 min(-0.75, -0.6) = -0.75 (not cut: r A < clip A)  0
#
# per token -(surrogate - 0.1 * KL):
#   s0: -(1.2 - 0.0193147) = -1.1806853, -1.0    s1: -(-0.8 - 0.0306853) = 0.8306853
#   s2: -0.55, -0.5                              s3: 0.75
#   sum = -1.65 over 6 tokens
#   token_mean    = -1.65 / 6 = -0.275
#   sequence_mean = (-2.1806853 / 2 + 0.8306853 - 1.05 / 2 + 0.75) / 4 = -0.0346574 / 4 = -0.00866434
#   constant      = -1.65 / (4 sequences * L_max 2) = -0.20625
#   KL mean = (0.193147 + 0.306853) / 6 = 0.5 / 6;  clip fraction = 2 / 6 (s0 t0, s1 t0);
#   ratio mean = (1.5 + 1 + 0.5 + 1.1 + 1 + 1.5) / 6 = 1.1
PI = [[0.6, 0.5], [0.2, 0.7], [0.33, 0.9], [0.6, 0.1]]
PI_OLD = [[0.4, 0.5], [0.4, 0.1], [0.3, 0.9], [0.4, 0.9]]
PI_REF = [[0.3, 0.5], [0.4, 0.2], [0.33, 0.9], [0.6, 0.3]]
MASK = [[1, 1], [1, 0], [1, 1], [1, 0]]
REWARDS = [3.0, 1.0, 1.5, 0.5]


def hand_inputs() -> LossInputs:
    advantages, scored = group_advantages(REWARDS, group_size=2, scale_rewards="none")
    assert advantages.tolist() == [1.0, -1.0, 0.5, -0.5] and scored.all()
    logprobs = torch.tensor(PI, dtype=torch.float64).log().requires_grad_()
    return LossInputs(logprobs=logprobs, old_logprobs=torch.tensor(PI_OLD, dtype=torch.float64).log(),
                      ref_logprobs=torch.tensor(PI_REF, dtype=torch.float64).log(), advantages=advantages.double(),
                      mask=torch.tensor(MASK))


@pytest.mark.parametrize(("aggregation", "expected"), [
    ("token_mean", -0.275), ("sequence_mean", -0.0346574 / 4), ("constant", -0.20625)])
def test_grpo_loss_matches_the_hand_computed_example(aggregation: str, expected: float) -> None:
    loss, metrics = grpo_loss(hand_inputs(), config(loss_aggregation=aggregation))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.5 / 6)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 6)
    assert metrics["ratio_mean"].item() == pytest.approx(1.1)
    assert metrics["tokens"].item() == 6


def test_padding_values_cannot_leak_into_the_loss() -> None:
    inputs = hand_inputs()
    wild = inputs.old_logprobs.clone()
    wild[1, 1] = -500.0  # exp(0 + 500) would overflow to inf, and inf * 0 is NaN
    logprobs = inputs.logprobs.detach().clone().requires_grad_()
    loss, _ = grpo_loss(LossInputs(logprobs, wild, inputs.ref_logprobs, inputs.advantages, inputs.mask), config())
    loss.backward()
    assert loss.item() == pytest.approx(-0.275)
    assert logprobs.grad is not None and logprobs.grad.isfinite().all()


def test_gradient_through_clipped_tokens_is_only_the_kl_term() -> None:
    inputs = hand_inputs()
    loss, _ = grpo_loss(inputs, config())
    loss.backward()
    grad = inputs.logprobs.grad
    assert grad is not None
    # s1 t0 is clipped: d/dlogp of beta * k3 = beta * (1 - pi_ref / pi) = 0.1 * (1 - 2) = -0.1, over Z = 6 tokens.
    assert grad[1, 0].item() == pytest.approx(-0.1 / 6)
    # s2 t0 is not: d/dlogp of -(ratio * A) = -ratio * A = -1.1 * 0.5, and its KL is 0 (pi == pi_ref).
    assert grad[2, 0].item() == pytest.approx(-0.55 / 6)
    # padding gets nothing
    assert grad[1, 1].item() == 0 and grad[3, 1].item() == 0


def test_clip_epsilon_high_lets_a_positive_ratio_rise_further() -> None:
    # With 1 + eps_high = 1.6, s0 t0's ratio 1.5 is inside the range: surrogate 1.5 instead of 1.2, so
    # the sum falls by 0.3: -1.95 / 6.
    loss, metrics = grpo_loss(hand_inputs(), config(clip_epsilon_high=0.6))
    assert loss.item() == pytest.approx(-1.95 / 6)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 6)


def test_k3_kl_is_zero_for_the_reference_itself_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    logprobs = torch.randn(3, 5).log_softmax(-1)
    mask = torch.ones(3, 5)
    same = LossInputs(logprobs, logprobs, logprobs.clone(), torch.tensor([1.0, -1.0, 0.0]), mask)
    _, metrics = grpo_loss(same, config())
    assert metrics["kl"].item() == 0.0
    reference = torch.randn(3, 5).log_softmax(-1)
    loss, metrics = grpo_loss(LossInputs(logprobs, logprobs, reference, torch.zeros(3), mask), config())
    assert metrics["kl"].item() > 0
    assert loss.item() == pytest.approx(0.1 * metrics["kl"].item())  # zero advantages: only beta * KL is left
    assert (KL_ESTIMATORS["k3"](logprobs, reference) >= 0).all()


def test_kl_beta_needs_reference_logprobs() -> None:
    inputs = hand_inputs()
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(LossInputs(inputs.logprobs, inputs.old_logprobs, None, inputs.advantages, inputs.mask), config())
    loss, metrics = grpo_loss(LossInputs(inputs.logprobs, inputs.old_logprobs, None, inputs.advantages, inputs.mask),
                              config(kl_beta=0.0))
    assert metrics["kl"].item() == 0.0
    # Without the KL term: -(1.2 + 1.0 - 0.8 + 0.55 + 0.5 - 0.75) / 6 = -1.7 / 6
    assert loss.item() == pytest.approx(-1.7 / 6)


def test_sequence_and_token_aggregation_weigh_lengths_differently() -> None:
    # On-policy (ratio 1), no KL: the per-token loss is -A. A one-token sample with A = +1 and a
    # three-token sample with A = -1:
    #   token_mean    = (-1 + 3 * 1) / 4 tokens      = 0.5   (the long sample dominates)
    #   sequence_mean = (-1 / 1 + 3 / 3) / 2 samples  = 0.0   (each sample counts once)
    #   constant      = (-1 + 3) / (2 samples * 4)   = 0.25
    logprobs = torch.zeros(2, 3)
    inputs = LossInputs(logprobs, logprobs, None, torch.tensor([1.0, -1.0]), torch.tensor([[1, 0, 0], [1, 1, 1]]))
    results = {name: grpo_loss(inputs, config(kl_beta=0.0, loss_aggregation=name, max_completion_length=4))[0].item()
               for name in ("token_mean", "sequence_mean", "constant")}
    assert results == pytest.approx({"token_mean": 0.5, "sequence_mean": 0.0, "constant": 0.25}, abs=1e-6)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_micro_batch_losses_with_the_steps_normalizer_sum_to_the_whole(aggregation: str) -> None:
    inputs, settings = hand_inputs(), config(loss_aggregation=aggregation)
    assert inputs.ref_logprobs is not None
    whole, _ = grpo_loss(inputs, settings)
    z = normalizer(inputs.mask, settings)
    parts = [grpo_loss(LossInputs(inputs.logprobs[rows], inputs.old_logprobs[rows], inputs.ref_logprobs[rows],
                                  inputs.advantages[rows], inputs.mask[rows], normalizer=z), settings)[0]
             for rows in (slice(0, 1), slice(1, 4))]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item())


def test_unscored_samples_are_out_of_the_normalizer() -> None:
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]])  # sample 1 unscored: the step zeroed its mask
    assert normalizer(mask, config(loss_aggregation="token_mean")).item() == 3
    assert normalizer(mask, config(loss_aggregation="sequence_mean")).item() == 2
    assert normalizer(mask, config(loss_aggregation="constant")).item() == 2 * 2
    assert normalizer(torch.zeros(2, 2), config()).item() == 1  # nothing scored: a zero loss, not 0 / 0


# -- advantages

def test_group_advantages_standardise_within_each_group() -> None:
    # group 1: mean 1, sample std 1 -> [-1, 0, 1]; group 2: identical rewards -> exactly 0.
    advantages, scored = group_advantages([0.0, 1.0, 2.0, 5.0, 5.0, 5.0], group_size=3, eps=0.0)
    assert advantages.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert scored.all()
    advantages, _ = group_advantages([0.0, 1.0, 2.0], group_size=3)  # default eps 1e-4
    assert advantages.tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001])


def test_identical_rewards_give_exact_zeros_even_where_the_mean_rounds() -> None:
    advantages, _ = group_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], group_size=3)
    assert advantages.tolist() == [0.0] * 6


def test_unscored_samples_leave_the_group_statistics() -> None:
    # [1, None, 3]: mean 2 and sample std sqrt(2) over the two scored ones -> -+1/sqrt(2); None -> 0, unscored.
    # [None, 4, None]: one scored sample, nothing to compare -> 0.  [None, None, None]: nothing scored.
    rewards = [1.0, None, 3.0, None, 4.0, None, None, None, None]
    advantages, scored = group_advantages(rewards, group_size=3, eps=0.0)
    half = 1 / math.sqrt(2)
    assert advantages.tolist() == pytest.approx([-half, 0.0, half, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert scored.tolist() == [True, False, True, False, True, False, False, False, False]


def test_dr_grpo_does_not_divide_by_the_std() -> None:
    advantages, _ = group_advantages([0.0, 2.0, 4.0, 1.0, 1.0, 4.0], group_size=3, scale_rewards="none")
    assert advantages.tolist() == [-2.0, 0.0, 2.0, -1.0, -1.0, 2.0]


def test_batch_scaling_uses_one_std_for_every_group() -> None:
    rewards = [0.0, 2.0, 10.0, 14.0]
    advantages, _ = group_advantages(rewards, group_size=2, scale_rewards="batch", eps=0.0)
    std = torch.tensor(rewards).std().item()
    assert advantages.tolist() == pytest.approx([-1 / std, 1 / std, -2 / std, 2 / std])


def test_rewards_must_fill_whole_groups() -> None:
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 2.0], group_size=3)


def test_weighted_rewards_and_statistics() -> None:
    total = weighted_rewards({"wer": [1.0, 0.5, None], "hallucination": [-1.0, 0.0, 1.0]}, {"hallucination": 0.5})
    assert total == [0.5, 0.5, None]
    with pytest.raises(ValueError, match="no reward component"):
        weighted_rewards({"wer": [1.0]}, {"keywords": 1.0})
    stats = reward_statistics([1.0, 1.0, 0.0, None], group_size=2)
    assert stats["reward_mean"] == pytest.approx(2 / 3)
    assert stats["unscored_fraction"] == 0.25
    assert stats["zero_std_group_fraction"] == 1.0  # [1, 1] equal; [0, None] one scored


# -- logprobs from logits

def test_token_logprobs_match_the_naive_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    naive = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ours = token_logprobs(logits, tokens)
    torch.testing.assert_close(ours, naive)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_naive,) = torch.autograd.grad(naive.sum(), logits)
    torch.testing.assert_close(g_ours, g_naive)
    hot = (logits / 0.7).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), hot)
    # bf16 logits are scored in float32
    half = logits.detach().bfloat16()
    exact = half.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert token_logprobs(half, tokens).dtype == torch.float32
    torch.testing.assert_close(token_logprobs(half, tokens), exact)


def test_token_entropy_matches_the_definition() -> None:
    logits = torch.randn(2, 4, 7)
    p = logits.softmax(-1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))


# -- config

def test_config_defaults_are_the_papers() -> None:
    settings = GRPOConfig()
    assert (settings.group_size, settings.batch_size, settings.learning_rate, settings.kl_beta) == (12, 32, 1e-5, 0.1)
    assert settings.micro_batches_per_step == 48  # 384 samples, 8 per micro-batch, one optimizer step
    assert "grpo" in LOSSES


@pytest.mark.parametrize(("overrides", "message"), [
    ({"loss": "ppo"}, r"loss must be one of \[.*'grpo\+diffro'"),
    ({"scale_rewards": "std"}, "scale_rewards must be one of"),
    ({"loss_aggregation": "mean"}, "loss_aggregation must be one of"),
    ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
    ({"clip_epsilon": 1.5}, "clip_epsilon must be in"),
    ({"kl_beta": -1.0}, "kl_beta must be >= 0"),
    ({"gradient_accumulation_steps": 5}, "set gradient_accumulation_steps=0"),
    ({"group_size": 1}, "group_size must be >= 2"),
])
def test_config_invariants_say_what_to_change(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**overrides)


def test_config_from_a_mapping_and_flags() -> None:
    with pytest.raises(ValueError, match="beta: not a field of GRPOConfig; known: .*kl_beta"):
        from_mapping(GRPOConfig, {"beta": 0.1})
    parser = argparse.ArgumentParser()
    add_arguments(parser, GRPOConfig)
    args = parser.parse_args(["--lora", "--lora-target-modules", "q_proj", "v_proj", "--clip-epsilon-high", "0.28",
                              "--reward-weights", "wer=1", "hallucination=0.5"])
    settings = from_namespace(GRPOConfig, "grpo", args, environ={}, base={"batch_size": 4, "lora_r": 8})
    assert settings.lora and settings.lora_r == 8 and settings.batch_size == 4
    assert settings.lora_target_modules == ("q_proj", "v_proj")
    assert settings.clip_high == 0.28 and settings.bf16 is None
    assert settings.reward_weights == {"wer": 1.0, "hallucination": 0.5}
    assert "k3" in parser.format_help()

"""DiffRO and grpo+diffro on hand-built tensors (issue 7): gradient path, token KL, the sample filter."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from speechrl.services.config import from_mapping
from speechrl.services.token2wav.token2reward import IMPOSSIBLE, Token2Reward, Token2RewardConfig
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.diffro import diffro_rows, gumbel_softmax, token_kl
from speechrl.trainer.core.losses import LossInputs, TokenReward, grpo_loss
from speechrl.trainer.core.objectives import LOSSES
from speechrl.trainer.models.token2reward import diffro_reward

B, T, V = 4, 5, 7


def _config(**overrides: object) -> GRPOConfig:
    return from_mapping(GRPOConfig, {"batch_size": 1, "group_size": B, "mini_batch_size": B, **overrides})


def _inputs(logits: Tensor, reward: object, *, advantages: Tensor | None = None, mask: Tensor | None = None,
            ref_logits: Tensor | None = None) -> LossInputs:
    """A micro-batch whose whole vocabulary is speech (no EOS), reward a plain score function."""
    zeros = torch.zeros(B, T)
    return LossInputs(logprobs=zeros, old_logprobs=zeros, ref_logprobs=zeros,
                      advantages=torch.ones(B) if advantages is None else advantages,
                      mask=torch.ones(B, T) if mask is None else mask, logits=logits,
                      ref_logits=logits.detach() if ref_logits is None else ref_logits,
                      diffro_reward=TokenReward(score=reward, speech_range=(0, V)))  # type: ignore[arg-type]


class _LinearReward:
    """R_i = sum_t <soft_i,t, w_t>: differentiable in soft; records the rows it was asked about."""

    def __init__(self) -> None:
        self.weights = torch.randn(T, V, generator=torch.Generator().manual_seed(1))  # [T, V]
        self.rows: list[list[int]] = []

    def __call__(self, soft: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        self.rows.append(rows.tolist())
        return (soft * self.weights * mask[..., None]).sum((1, 2))  # [b]


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_path_carries_the_reward_gradient_into_the_logits(hard: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(B, T, V, requires_grad=True)  # [B, T, V]
    config = _config(loss="diffro", diffro_hard=hard, diffro_beta=0.0, diffro_tau=0.7)
    loss, metrics = LOSSES["diffro"](_inputs(logits, _LinearReward()), config)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    assert torch.isfinite(metrics["diffro_reward"])


def test_gumbel_softmax_rows_are_distributions_and_hard_is_one_hot() -> None:
    generator = torch.Generator().manual_seed(0)
    soft = gumbel_softmax(torch.randn(3, V), 1.0, generator=generator)  # [3, V]
    assert torch.allclose(soft.sum(-1), torch.ones(3))
    hard = gumbel_softmax(torch.randn(3, V), 1.0, hard=True, generator=generator)  # [3, V]
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and torch.equal(hard.sum(-1), torch.ones(3))
    # Low tau concentrates the sample on the argmax of a peaked distribution.
    peaked = torch.tensor([[0.0, 10.0, 0.0]])
    assert gumbel_softmax(peaked, 0.1, generator=generator)[0, 1] > 0.99


def test_token_kl_is_zero_for_identical_policies_and_positive_otherwise() -> None:
    logits = torch.randn(B, T, V)
    assert torch.allclose(token_kl(logits, logits.clone()), torch.zeros(B, T), atol=1e-6)
    other = logits + torch.randn(B, T, V)
    assert (token_kl(logits, other) > 0).all()
    # Exact KL against a hand computation: p = (1/2, 1/2), q = (1/4, 3/4).
    p, q = torch.tensor([0.0, 0.0]), torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert token_kl(p, q).item() == pytest.approx(expected.item(), abs=1e-6)


def test_diffro_loss_of_identical_policies_is_minus_the_reward() -> None:
    logits = torch.randn(B, T, V, requires_grad=True)

    def constant(soft: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        return torch.full((len(rows),), 2.0) + 0 * soft.sum((1, 2))

    loss, metrics = LOSSES["diffro"](_inputs(logits, constant), _config(loss="diffro", diffro_beta=1.0))
    assert loss.item() == pytest.approx(-2.0)  # mean over 4 samples of -R = -2, KL = 0
    assert metrics["diffro_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_filter_passes_only_positive_advantage_samples_to_diffro() -> None:
    logits = torch.randn(B, T, V, requires_grad=True)
    advantages = torch.tensor([1.2, -0.5, 0.3, 0.0])
    mask = torch.ones(B, T)
    reward = _LinearReward()
    LOSSES["grpo+diffro"](_inputs(logits, reward, advantages=advantages, mask=mask), _config(loss="grpo+diffro"))
    assert reward.rows == [[0, 2]]
    loss, _ = LOSSES["grpo+diffro"](_inputs(logits, reward, advantages=advantages, mask=mask),
                                    _config(loss="grpo+diffro", diffro_filter=False))
    assert reward.rows[-1] == [0, 1, 2, 3]  # the ablation: every scored sample

    mask[2] = 0  # an unscored sample never enters, filtered or not
    inputs = _inputs(logits, reward, advantages=advantages, mask=mask)
    assert diffro_rows(inputs, use_filter=True).tolist() == [True, False, False, False]
    assert diffro_rows(inputs, use_filter=False).tolist() == [True, True, False, True]


def test_filtered_out_samples_get_no_diffro_gradient() -> None:
    logits = torch.randn(B, T, V, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, _ = LOSSES["diffro"](_inputs(logits, _LinearReward(), advantages=advantages), _config(loss="diffro"))
    config = _config(loss="grpo+diffro", diffro_beta=0.0)
    loss, _ = LOSSES["grpo+diffro"](_inputs(logits, _LinearReward(), advantages=advantages), config)
    loss.backward()  # GRPO's logprobs here are constants: only DiffRO reaches the logits
    assert logits.grad is not None
    assert logits.grad[[1, 3]].abs().sum() == 0 and logits.grad[[0, 2]].abs().sum() > 0


def test_combined_loss_is_grpo_plus_lambda_diffro() -> None:
    torch.manual_seed(3)
    logits = torch.randn(B, T, V)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    logprobs = torch.randn(B, T) * 0.1

    def reward(soft: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        return torch.full((len(rows),), -3.0)

    def inputs() -> LossInputs:
        return LossInputs(logprobs=logprobs, old_logprobs=logprobs * 0.9, ref_logprobs=logprobs * 1.1,
                          advantages=advantages, mask=torch.ones(B, T), logits=logits,
                          ref_logits=logits, diffro_reward=TokenReward(score=reward, speech_range=(0, V)))

    config = _config(loss="grpo+diffro", diffro_lambda=0.5, diffro_beta=0.0)
    combined, metrics = LOSSES["grpo+diffro"](inputs(), config)
    grpo, _ = grpo_loss(inputs(), config)
    diffro = 3.0 * 2 / B  # two samples pass, each -R = 3, over the 4 samples of the step
    assert combined.item() == pytest.approx(grpo.item() + 0.5 * diffro, rel=1e-5)
    assert metrics["diffro_samples"].item() == pytest.approx(0.5)


def test_diffro_without_its_inputs_says_what_is_missing() -> None:
    zeros = torch.zeros(B, T)
    bare = LossInputs(zeros, zeros, zeros, torch.ones(B), torch.ones(B, T))
    with pytest.raises(ValueError, match="logits and diffro_reward"):
        LOSSES["diffro"](bare, _config(loss="diffro"))
    with pytest.raises(ValueError, match="diffro_tau"):
        _config(diffro_tau=0.0)


# -- the relaxed token lives on the speech range (the DiffRO collapse of the first reproduction)
PAD, EOS, TEXT = 0, 1, 2  # non-speech ids of the policy vocabulary below
OFFSET, K = 3, 6  # speech ids 3..8
VOCAB = OFFSET + K


def _policy_inputs(logits: Tensor, score: object, completion_ids: Tensor, mask: Tensor,
                   ref_logits: Tensor | None = None) -> LossInputs:
    zeros = torch.zeros(mask.shape)
    return LossInputs(logprobs=zeros, old_logprobs=zeros, ref_logprobs=zeros, advantages=torch.ones(mask.shape[0]),
                      mask=mask, logits=logits, ref_logits=logits.detach() if ref_logits is None else ref_logits,
                      completion_ids=completion_ids,
                      diffro_reward=TokenReward(score=score, speech_range=(OFFSET, OFFSET + K),  # type: ignore[arg-type]
                                                stop_ids=(EOS,)))


def _sampled(batch: int, length: int) -> tuple[Tensor, Tensor]:
    """Completions of speech ids ending in EOS, the second one shorter (right-padded): ids, mask [b, L]."""
    ids = torch.randint(OFFSET, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))  # [b, L]
    ids[:, -1] = EOS
    ids[1, length - 3:] = torch.tensor([EOS, PAD, PAD])
    mask = ids != PAD  # [b, L]
    return ids, mask


def _reward_model() -> tuple[Token2Reward, list[str]]:
    torch.manual_seed(0)
    return Token2Reward(Token2RewardConfig(num_tokens=K, d_model=16, layers=1, heads=2, dropout=0.0)).eval(), \
        ["ab", "ba"]


def test_logit_mass_moved_to_eos_or_text_ids_cannot_change_the_diffro_reward() -> None:
    model, texts = _reward_model()
    ids, mask = _sampled(2, 6)
    logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(2))  # [2, 6, V]
    config = _config(loss="diffro", diffro_beta=0.0, group_size=2, mini_batch_size=2)
    rewards = []
    for boost in (0.0, 5.0):
        moved = logits.clone()
        moved[..., [PAD, EOS, TEXT]] += boost  # most of the probability now off the speech range
        torch.manual_seed(7)  # the same Gumbel noise both times
        _, metrics = LOSSES["diffro"](_policy_inputs(moved, diffro_reward(model, texts, (OFFSET, VOCAB), (EOS,)).score,
                                                     ids, mask), config)
        rewards.append(metrics["diffro_reward"].item())
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)


def test_diffro_reward_gradient_never_reaches_eos_or_other_non_speech_logits() -> None:
    model, texts = _reward_model()
    ids, mask = _sampled(2, 6)
    logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    config = _config(loss="diffro", diffro_beta=0.0, group_size=2, mini_batch_size=2)
    loss, _ = LOSSES["diffro"](_policy_inputs(logits, diffro_reward(model, texts, (OFFSET, VOCAB), (EOS,)).score,
                                              ids, mask), config)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[..., :OFFSET].abs().sum() == 0  # R moves speech logits only
    speech_rows = mask & (ids >= OFFSET)  # [2, 6]
    assert logits.grad[..., OFFSET:][speech_rows].abs().sum() > 0
    assert logits.grad[~speech_rows].abs().sum() == 0  # the EOS position is no input frame


def test_the_reward_reads_only_sampled_speech_positions_over_the_speech_range() -> None:
    seen: list[tuple[Tensor, Tensor]] = []

    def score(soft: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        seen.append((soft.detach(), mask))
        return soft.sum((1, 2))

    ids, mask = _sampled(2, 6)
    LOSSES["diffro"](_policy_inputs(torch.randn(2, 6, VOCAB), score, ids, mask),
                     _config(loss="diffro", diffro_beta=0.0, group_size=2, mini_batch_size=2))
    soft, speech = seen[0]
    assert soft.shape == (2, 6, K)
    assert speech.tolist() == (mask & (ids >= OFFSET)).tolist()
    assert torch.allclose(soft.sum(-1), speech.float())  # a distribution over K at each speech position, 0 elsewhere


def test_diffro_kl_covers_the_sampled_support_speech_plus_eos() -> None:
    ids, mask = _sampled(2, 6)
    logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(3))
    config = _config(loss="diffro", diffro_beta=1.0, group_size=2, mini_batch_size=2)

    def kl(ref: Tensor) -> float:
        _, metrics = LOSSES["diffro"](_policy_inputs(logits, lambda s, m, r: s.sum((1, 2)) * 0, ids, mask, ref),
                                      config)
        return metrics["diffro_kl"].item()

    text_moved = logits.clone()
    text_moved[..., TEXT] += 4.0  # an id the rollout never samples: no drift that could change a rollout
    assert kl(text_moved) == pytest.approx(0.0, abs=1e-6)
    eos_moved = logits.clone()
    eos_moved[..., EOS] += 4.0  # when to stop is part of the sampled distribution
    assert kl(eos_moved) > 0.1


def test_an_empty_or_too_short_sample_is_a_constant_penalty_with_a_finite_gradient() -> None:
    model, _ = _reward_model()
    soft = torch.softmax(torch.randn(3, 4, K), -1).requires_grad_(True)  # [3, 4, K]
    mask = torch.tensor([[True] * 4, [False] * 4, [True, False, False, False]])  # a full row, an empty one, one token
    texts = ["ab", "ab", "abcdef"]  # 1 token x 3 frames cannot spell 6 characters
    reward = model.log_prob_text(soft, mask, texts)  # [3]
    assert reward[1].item() == reward[2].item() == -IMPOSSIBLE
    assert -IMPOSSIBLE < reward[0].item() < 0
    reward.sum().backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all()  # CTC's inf used to send NaN back
    assert soft.grad[0].abs().sum() > 0 and soft.grad[1:].abs().sum() == 0

"""DiffRO and grpo+diffro on hand-built tensors (issue 7): gradient path, token KL, the sample filter."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from speechrl.trainer.config import GRPOConfig
from speechrl.trainer.diffro import diffro_rows, gumbel_softmax, token_kl
from speechrl.trainer.losses import LOSSES, LossInputs, grpo_loss

B, T, V = 4, 5, 7


def _config(**overrides: object) -> GRPOConfig:
    return GRPOConfig.from_dict({"batch_size": 1, "group_size": B, "mini_batch_size": B, **overrides})


def _inputs(logits: Tensor, reward: object, *, advantages: Tensor | None = None, mask: Tensor | None = None,
            ref_logits: Tensor | None = None) -> LossInputs:
    zeros = torch.zeros(B, T)
    return LossInputs(logprobs=zeros, old_logprobs=zeros, ref_logprobs=zeros,
                      advantages=torch.ones(B) if advantages is None else advantages,
                      mask=torch.ones(B, T) if mask is None else mask, logits=logits,
                      ref_logits=logits.detach() if ref_logits is None else ref_logits,
                      diffro_reward=reward)  # type: ignore[arg-type]


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
                          ref_logits=logits, diffro_reward=reward)

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

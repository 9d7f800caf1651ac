"""Policy losses, written to be checked against their papers' equations.

The GRPO objective (DeepSeekMath, arXiv 2402.03300, eq. 3; the ASR paper's eq. 1), with DAPO's
decoupled clip range (arXiv 2503.14476) and a choice of normaliser Z:

    J(theta) = 1/Z * sum_i sum_t w_i,t * [ min(rho_i,t * A_i, clip(rho_i,t, 1 - eps, 1 + eps_high) * A_i)
                                           - beta * D_i,t ]
    rho_i,t  = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t) = exp(logp - old_logp)
    D_i,t    = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 = exp(ref_logp - logp) - (ref_logp - logp) - 1
               (Schulman's k3 estimator of KL(pi_theta || pi_ref): unbiased, >= 0)
    loss     = -J(theta)

and w, Z set by loss_aggregation (m_i,t is 1 on counted completion tokens, |o_i| = sum_t m_i,t):

    token_mean:     w = m,           Z = sum_i |o_i|             every token weighs the same (DAPO)
    sequence_mean:  w = m / |o_i|,   Z = number of sequences     mean per sequence, then over them (GRPO)
    constant:       w = m,           Z = sequences * L_max        Dr. GRPO's length-unbiased sum

Gradient accumulation: the step computes Z once over the whole optimizer step and passes it as
`normalizer`, so the losses of its micro-batches sum to the loss of the step taken at once; with
`normalizer=None` a call normalises over its own batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from speechrl.trainer.core.config import AggregationName, GRPOConfig, KlEstimatorName

Metrics = dict[str, Tensor]  # detached scalars; the step turns them into floats once per update


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch as every loss variant sees it: B samples, T completion tokens.

    A variant that needs more than these (DiffRO: the policy's and the reference's logits
    [B, T, V], the token-input reward model) adds optional fields here, which step.py fills.
    The variants by name are objectives.LOSSES.
    """

    logprobs: Tensor  # [B, T] log pi_theta of the completion tokens; carries the gradient
    old_logprobs: Tensor  # [B, T] log pi_old, the policy that sampled; detached
    ref_logprobs: Tensor | None  # [B, T] log pi_ref, detached; None when kl_beta == 0
    advantages: Tensor  # [B] A_i, one per sample
    mask: Tensor  # [B, T] 1 on completion tokens that count; 0 on padding and on unscored samples
    normalizer: Tensor | float | None = None  # Z of the whole optimizer step; None: this batch's own
    entropy: Tensor | None = None  # [B, T] per-token entropy of pi_theta, for metrics only
    # -- DiffRO (diffro.py): the full distributions and the differentiable reward
    logits: Tensor | None = None  # [B, T, V] pi_theta's logits at the completion positions; carries the gradient
    ref_logits: Tensor | None = None  # [B, T, V] pi_ref's logits there, detached; None when diffro_beta == 0
    diffro_reward: TokenReward | None = None  # R = log P(text | soft speech tokens) and the ids it reads
    completion_ids: Tensor | None = None  # [B, T] the sampled ids (DiffRO: which positions hold a speech token);
    # None: every counted position does
    sample_normalizer: Tensor | float | None = None  # samples of the whole optimizer step; None: this batch's B


@dataclass(frozen=True)
class TokenReward:
    """DiffRO's differentiable reward and the part of the policy's vocabulary it reads (diffro.py).

    The relaxed token lives on the speech range only: the reward model embeds those K ids and
    nothing else, so probability elsewhere (EOS) must not be able to change R.
    """

    score: Callable[[Tensor, Tensor, Tensor], Tensor]  # (soft [b, T, K] over the speech range, mask [b, T] of the
    # speech positions, rows [b] of this micro-batch) -> R [b], differentiable in soft
    speech_range: tuple[int, int]  # [begin, end) of the policy's ids: the K speech tokens the reward model embeds
    stop_ids: tuple[int, ...] = ()  # the other ids the rollout samples (EOS); with the speech range, the KL's support


# -- per-token KL estimators of KL(pi_theta || pi_ref), from logp = log pi_theta, ref = log pi_ref, [B, T]
KL_ESTIMATORS: dict[KlEstimatorName, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": lambda logp, ref: logp - ref,  # unbiased, can be < 0, high variance
    "k2": lambda logp, ref: 0.5 * (logp - ref) ** 2,  # biased, >= 0, low variance
    "k3": lambda logp, ref: torch.exp(ref - logp) - (ref - logp) - 1,  # unbiased, >= 0, low variance
}


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become one number: sum(weights(mask) * per_token) / count(step's mask)."""

    weights: Callable[[Tensor], Tensor]  # mask [B, T] -> w [B, T]
    count: Callable[[Tensor, GRPOConfig], Tensor]  # mask [B, T] of the optimizer step -> Z, a scalar


def _sequences(mask: Tensor) -> Tensor:
    return (mask.sum(1) > 0).sum()  # [] sequences with at least one counted token


AGGREGATIONS: dict[AggregationName, Aggregation] = {
    "token_mean": Aggregation(weights=lambda m: m, count=lambda m, c: m.sum()),
    "sequence_mean": Aggregation(weights=lambda m: m / m.sum(1, keepdim=True).clamp(min=1),
                                 count=lambda m, c: _sequences(m)),
    "constant": Aggregation(weights=lambda m: m, count=lambda m, c: _sequences(m) * c.max_completion_length),
}


def normalizer(mask: Tensor, config: GRPOConfig, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Z of config.loss_aggregation over the mask [B, T] of a whole optimizer step (at least 1).

    Data-parallel: mask is this rank's part of the step and all_reduce sums a tensor over the ranks;
    every count is a sum over samples, so the sum of the ranks' counts is the whole step's.
    """
    count = AGGREGATIONS[config.loss_aggregation].count(mask.float(), config)  # []
    return (count if all_reduce is None else all_reduce(count)).clamp(min=1)  # clamped after the sum, not per rank


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)  # []


def grpo_loss(inputs: LossInputs, config: GRPOConfig) -> tuple[Tensor, Metrics]:
    """-J(theta) of the module docstring, for one micro-batch; returns (loss [], metrics).

    >>> zeros = torch.zeros(1, 2)
    >>> loss, metrics = grpo_loss(LossInputs(zeros, zeros, zeros, torch.tensor([1.0]), torch.ones(1, 2)),
    ...                           GRPOConfig(batch_size=1, group_size=2, mini_batch_size=2))
    >>> loss.item(), metrics["kl"].item(), metrics["clip_fraction"].item()
    (-1.0, 0.0, 0.0)
    """
    counted = inputs.mask.bool()  # [B, T]
    # Padding may hold anything; zeroed here, exp() of it can neither overflow nor send NaN backwards.
    logprobs = inputs.logprobs.masked_fill(~counted, 0.0)  # [B, T]
    mask = counted.to(logprobs.dtype)  # [B, T]
    advantages = inputs.advantages.to(logprobs.dtype)[:, None]  # [B, 1]

    ratio = torch.exp(logprobs - inputs.old_logprobs.masked_fill(~counted, 0.0))  # [B, T] rho
    clipped = ratio.clamp(1 - config.clip_epsilon, 1 + config.clip_high)  # [B, T]
    surrogate = torch.min(ratio * advantages, clipped * advantages)  # [B, T] the pessimistic bound

    if config.kl_beta > 0:
        if inputs.ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs; pass the reference's logprobs or set kl_beta=0")
        kl = KL_ESTIMATORS[config.kl_estimator](logprobs, inputs.ref_logprobs.masked_fill(~counted, 0.0))  # [B, T]
    else:
        kl = torch.zeros_like(logprobs)  # [B, T]

    per_token = -(surrogate - config.kl_beta * kl)  # [B, T]
    aggregation = AGGREGATIONS[config.loss_aggregation]
    z = normalizer(inputs.mask, config) if inputs.normalizer is None else inputs.normalizer
    loss = (aggregation.weights(mask) * per_token).sum() / z  # []

    with torch.no_grad():
        # Tokens whose gradient the clip cuts: the clipped term is the smaller one and it is constant.
        cut = ((ratio < 1 - config.clip_epsilon) & (advantages < 0)) | (
            (ratio > 1 + config.clip_high) & (advantages > 0))  # [B, T]
        sequences = mask.sum(1) > 0  # [B]
        metrics = {
            "loss": loss.detach(),
            "kl": _masked_mean(kl, mask),
            "clip_fraction": _masked_mean(cut.to(mask.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "advantage_mean": _masked_mean(advantages.squeeze(1), sequences.to(mask.dtype)),
            "tokens": mask.sum(),
        }
        if inputs.entropy is not None:
            metrics["entropy"] = _masked_mean(inputs.entropy, mask)
    return loss, metrics


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] at every position: [B, T, V], [B, T] -> [B, T] float32.

    Computed as x[token] - logsumexp(x), one row at a time in float32: no [B, T, V] log-softmax is
    materialised, and bf16 logits are upcast one [T, V] row at a time rather than all at once
    (autograd keeps those rows for the backward: one float32 copy in all, not two).

    >>> logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    >>> token_logprobs(logits, torch.tensor([[1, 0]])).exp()
    tensor([[0.5000, 0.8808]])
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):  # [T, V], [T]
        row_logits = row_logits.float()  # [T, V] a copy only when the logits are bf16 / fp16
        if temperature != 1.0:
            row_logits = row_logits / temperature  # [T, V]
        picked = row_logits.gather(-1, row_tokens[:, None]).squeeze(-1)  # [T]
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))  # [T]
    return torch.stack(rows)  # [B, T]


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at every position, for metrics: [B, T, V] -> [B, T] float32."""
    rows = []
    for row_logits in logits:  # [T, V]
        row_logits = row_logits.float() / temperature  # [T, V]
        logz = torch.logsumexp(row_logits, dim=-1)  # [T]
        # H = -sum p log p = logZ - sum p * x, with p = softmax(x)
        rows.append(logz - (torch.softmax(row_logits, dim=-1) * row_logits).sum(-1))  # [T]
    return torch.stack(rows)  # [B, T]

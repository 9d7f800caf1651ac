"""DiffRO (arXiv 2507.05911) and its combination with GRPO under the sample filter (issue 7).

DiffRO differentiates a reward through the policy's token choices with Gumbel-Softmax:

    y_i,t   = softmax((z_i,t[S] / T + g_i,t) / tau),  g ~ Gumbel(0, 1)     relaxed token [K] over the speech ids S
              (straight-through when hard: one_hot(argmax y) forward, y's gradient backward)
    R_i     = log P(text_i | y_i,t for t at the sampled speech tokens)   the token-input reward model (token2reward.py)
    KL_i    = sum_t KL(pi_theta(.|t) || pi_ref(.|t))   exact, over S + {EOS} (what the rollout samples from)
    L_DiffRO = 1/N * sum_i [ -R_i + beta * KL_i ]

Where the relaxed token lives (TokenReward.speech_range). The rollout samples in SPEECH_TOKENS mode
from softmax over the speech range S and EOS only, and the reward model embeds only S. Relaxing over
the whole vocabulary V instead (the first version) makes y's speech part sum to 1 - p(non-speech):
moving mass to EOS or a text id shrinks the embedded input toward zero, a direction the reward model
never saw in training and the policy can exploit. So y is a softmax over S alone (the distribution of
the next speech token given that one is spoken), non-speech logits get no gradient from R, and the
EOS position of a sample is not an input frame. The length of each sample is the rollout's (teacher
forcing on its own tokens, as in the paper); DiffRO's R does not choose where to stop, and the KL,
taken over the sampled support S + {EOS} at every position including the EOS one, keeps p(EOS) near
the reference. Ids the rollout never samples are outside the KL, which would otherwise measure a
drift that cannot change a single rollout.

An impossible alignment (a sample with fewer CTC frames than its text needs; an empty one has none)
is a constant penalty with no gradient (token2reward.IMPOSSIBLE), never +inf: CTC's gradient of an
infinite loss is NaN, and one such sample once turned every policy weight into NaN.

The positions t are the rollout's completion positions (teacher forcing on the sampled tokens, as
the paper's policy feeds back its own samples), so DiffRO needs the logits [B, T, V] there, which
step.py puts in LossInputs.logits, with the sampled ids (LossInputs.completion_ids). The combined
loss is

    L = L_GRPO(all samples) + lambda * L_DiffRO(samples with A_i > 0)

where the filter (diffro_filter) keeps DiffRO from pushing toward samples that GRPO already
judged worse than their group; switched off, DiffRO sees every scored sample. N is the step's
sample count (LossInputs.sample_normalizer), not the filtered count, so micro-batch losses add up
to the step's and lambda keeps its meaning when few samples pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.losses import LossInputs, Metrics, TokenReward, grpo_loss


def gumbel_softmax(logits: Tensor, tau: float, *, hard: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """Relaxed samples of softmax(logits) along the last axis: [..., V] -> [..., V], rows summing to 1.

    hard: straight-through, exactly one-hot forward and the soft sample's gradient backward.
    torch's F.gumbel_softmax takes no generator; this one does, so tests and runs are reproducible.

    >>> y = gumbel_softmax(torch.zeros(2, 3), 0.5, hard=True, generator=torch.Generator().manual_seed(0))
    >>> y.sum(-1).tolist()
    [1.0, 1.0]
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device if generator is None else "cpu")
    uniform = uniform.to(logits.device).clamp(1e-10, 1 - 1e-7)  # [..., V] away from log(0)
    gumbel = -torch.log(-torch.log(uniform))  # [..., V]
    soft = torch.softmax((logits.float() + gumbel) / tau, dim=-1)  # [..., V]
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)  # [..., V]
    return one_hot - soft.detach() + soft  # [..., V] straight-through


def token_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) at every position, exact over V: [..., V] -> [...].

    >>> token_kl(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])).item()
    0.0
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [..., V]
    logq = torch.log_softmax(ref_logits.float(), dim=-1)  # [..., V]
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)  # [...] >= 0 up to rounding


def diffro_rows(inputs: LossInputs, use_filter: bool) -> Tensor:
    """Samples [B] (bool) that enter the DiffRO term: scored (some counted token), and A_i > 0 when filtering."""
    rows = inputs.mask.bool().any(1)  # [B] unscored samples have an all-zero mask
    if use_filter:
        rows = rows & (inputs.advantages > 0)  # [B] the sample filter
    return rows


def speech_positions(inputs: LossInputs, reward: TokenReward) -> Tensor:
    """Counted positions [B, T] (bool) whose sampled id is a speech token: the reward model's input frames."""
    mask = inputs.mask.bool()  # [B, T]
    if inputs.completion_ids is None:
        return mask
    begin, end = reward.speech_range
    return mask & (inputs.completion_ids >= begin) & (inputs.completion_ids < end)  # [B, T] EOS out


def support_ids(reward: TokenReward, vocab_size: int, device: torch.device) -> Tensor:
    """The ids the rollout samples from, [K + stops]: the speech range, then the stop ids (EOS)."""
    begin, end = reward.speech_range
    if not 0 <= begin < end <= vocab_size:
        raise ValueError(f"speech_range [{begin}, {end}) is not inside the policy's {vocab_size} ids")
    return torch.tensor([*range(begin, end), *reward.stop_ids], dtype=torch.long, device=device)


def _diffro_term(inputs: LossInputs, config: GRPOConfig, rows: Tensor) -> tuple[Tensor, Metrics]:
    """sum over `rows` of (-R_i + beta * KL_i) / N; (loss [], metrics)."""
    if inputs.logits is None or inputs.diffro_reward is None:
        raise ValueError("DiffRO needs LossInputs.logits and diffro_reward; the step fills them for loss "
                         "'diffro' / 'grpo+diffro' when the job provides a token-input reward model")
    reward_model = inputs.diffro_reward
    count = inputs.mask.shape[0] if inputs.sample_normalizer is None else inputs.sample_normalizer
    zero = inputs.logits.sum() * 0.0  # [] keeps the graph (and a grad of zeros) when no sample passes
    if not bool(rows.any()):
        metrics = {"diffro_reward": torch.zeros(()), "diffro_kl": torch.zeros(()), "diffro_samples": torch.zeros(())}
        return zero, metrics
    index = rows.nonzero().squeeze(1)  # [b]
    begin, end = reward_model.speech_range
    support = support_ids(reward_model, inputs.logits.shape[-1], inputs.logits.device)  # [K + stops]
    logits = inputs.logits[index].index_select(-1, support).float() / config.temperature  # [b, T, K + stops]
    sub_mask = inputs.mask.bool()[index]  # [b, T] every counted position (the KL's)
    speech = speech_positions(inputs, reward_model)[index]  # [b, T] sampled speech tokens (the reward's input)
    soft = gumbel_softmax(logits[..., :end - begin], config.diffro_tau, hard=config.diffro_hard)  # [b, T, K]
    soft = soft * speech[..., None]  # [b, T, K] EOS and padding carry no token
    reward = reward_model.score(soft, speech, index)  # [b] log P(text | soft speech tokens)
    if config.diffro_beta > 0:
        if inputs.ref_logits is None:
            raise ValueError("diffro_beta > 0 needs ref_logits; pass the reference's logits or set diffro_beta=0")
        ref = inputs.ref_logits[index].index_select(-1, support).float() / config.temperature  # [b, T, K + stops]
        kl = (token_kl(logits, ref) * sub_mask).sum(1)  # [b]
    else:
        kl = torch.zeros_like(reward)  # [b]
    loss = (-reward + config.diffro_beta * kl).sum() / count + zero  # []
    with torch.no_grad():
        metrics = {"diffro_reward": reward.mean().detach(), "diffro_kl": kl.mean().detach(),
                   "diffro_samples": rows.float().mean()}
    return loss, metrics


def diffro_loss(inputs: LossInputs, config: GRPOConfig) -> tuple[Tensor, Metrics]:
    """L_DiffRO over every scored sample of the micro-batch (advantages unused); (loss [], metrics)."""
    loss, metrics = _diffro_term(inputs, config, diffro_rows(inputs, use_filter=False))
    return loss, {**metrics, "loss": loss.detach(), "tokens": inputs.mask.float().sum()}


def grpo_diffro_loss(inputs: LossInputs, config: GRPOConfig) -> tuple[Tensor, Metrics]:
    """L_GRPO over all samples + diffro_lambda * L_DiffRO over the filtered ones; (loss [], metrics).

    Metrics are GRPO's, the DiffRO term's (diffro_*), and both losses apart (grpo_loss, diffro_loss).
    """
    grpo, grpo_metrics = grpo_loss(inputs, config)
    diffro, diffro_metrics = _diffro_term(inputs, config, diffro_rows(inputs, config.diffro_filter))
    loss = grpo + config.diffro_lambda * diffro  # []
    return loss, {**grpo_metrics, **diffro_metrics, "grpo_loss": grpo.detach(), "diffro_loss": diffro.detach(),
                  "loss": loss.detach()}

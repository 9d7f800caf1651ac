"""One GRPO policy update on a scored rollout batch, readable top to bottom.

    advantages  <- group_advantages(rewards)                     per sample, from its group
    old, ref    <- logprobs under pi_old (= pi_theta now) and pi_ref, no gradient
    for each of num_iterations passes:
        for each optimizer step (gradient_accumulation_steps micro-batches):
            Z <- the step's normaliser (loss_aggregation)
            for each micro-batch: loss = LOSSES[config.loss](...) / Z; loss.backward()
            clip the gradient norm; optimizer.step()

Rollout, scoring and weight sync are the caller's (the trainer's step); this is the math on the
trainer's device, with no services involved. The data-parallel update (distributed.py) runs this
same function on each rank's shard, with the advantages of the full batch and Z summed over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from speechrl.trainer.core.advantages import group_advantages, reward_statistics
from speechrl.trainer.core.config import LOGIT_LOSSES, GRPOConfig
from speechrl.trainer.core.losses import LossInputs, TokenReward, normalizer
from speechrl.trainer.core.objectives import LOSSES
from speechrl.trainer.core.policy import (
    CompletionScores,
    Reference,
    completion_forward,
    trainable_parameters,
    warm_up_learning_rate,
)


@dataclass(frozen=True)
class RolloutBatch:
    """One step's samples: P prompts x G completions, in group order (sample i answers prompt i // G).

    Prompts are stored once per prompt, not once per sample: an ASR prompt's audio embeddings
    repeated G times would be G times the memory.
    """

    completion_ids: Tensor  # [N, T] sampled token ids, N = P * G, padded on either side
    completion_mask: Tensor  # [N, T] 1 on sampled tokens (EOS included), 0 on padding
    rewards: Sequence[float | None]  # N (weighted) rewards; None: the sample could not be scored
    prompt_mask: Tensor  # [P, S] 1 on prompt positions
    prompt_ids: Tensor | None = None  # [P, S] token-id prompts, or
    prompt_embeds: Tensor | None = None  # [P, S, H] embedding prompts (audio embeddings + instruction)
    diffro_reward: TokenReward | None = None  # losses "diffro" / "grpo+diffro": R = log P(text_i | soft tokens)

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.prompt_embeds is None):
            raise ValueError("a RolloutBatch needs exactly one of prompt_ids and prompt_embeds")
        samples, prompts = self.completion_ids.shape[0], self.prompt_mask.shape[0]
        if samples != len(self.rewards) or samples != self.completion_mask.shape[0]:
            raise ValueError(f"completion_ids has {samples} rows, completion_mask {self.completion_mask.shape[0]}, "
                             f"rewards {len(self.rewards)}: one each per sample")
        if prompts == 0 or samples % prompts:
            raise ValueError(f"{samples} samples do not split into equal groups over {prompts} prompts")

    @property
    def group_size(self) -> int:
        return self.completion_ids.shape[0] // self.prompt_mask.shape[0]

    def to(self, device: torch.device) -> RolloutBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, completion_ids=self.completion_ids.to(device),
                       completion_mask=self.completion_mask.to(device).bool(),
                       prompt_mask=self.prompt_mask.to(device).bool(), prompt_ids=move(self.prompt_ids),
                       prompt_embeds=move(self.prompt_embeds))


def sampled_sequences(samples: Sequence[Any], eos_token_id: int) -> list[list[int]]:
    """Each sample's token ids, with EOS appended where it stopped (EOS is what the policy sampled there)."""
    return [list(s.token_ids) + ([eos_token_id] if s.finish_reason == "stop" else []) for s in samples]


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, T] and mask [N, T] (1 on real tokens); T >= 1 even when all are empty."""
    width = max(1, max((len(s) for s in sequences), default=0))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros(len(sequences), width, dtype=torch.long)  # [N, T]
    for i, sequence in enumerate(sequences):
        ids[i, :len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[i, :len(sequence)] = 1
    return ids, mask


def use_bf16(config: GRPOConfig, device: torch.device) -> bool:
    """config.bf16, or when unset: on where the device computes bf16 natively (CUDA with bf16)."""
    if config.bf16 is not None:
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def batch_forward(model: nn.Module, batch: RolloutBatch, rows: Tensor, config: GRPOConfig, *,
                  with_entropy: bool = False, with_logits: bool = False) -> CompletionScores:
    """completion_forward of the samples `rows` [M] of the batch (logprobs [M, T], entropy, logits [M, T, V])."""
    prompt_rows = rows // batch.group_size  # [M] the prompt each sample answers
    return completion_forward(
        model, batch.completion_ids[rows], batch.completion_mask[rows],
        prompt_mask=batch.prompt_mask[prompt_rows],
        prompt_ids=None if batch.prompt_ids is None else batch.prompt_ids[prompt_rows],
        prompt_embeds=None if batch.prompt_embeds is None else batch.prompt_embeds[prompt_rows],
        temperature=config.temperature, with_entropy=with_entropy, with_logits=with_logits)


def batch_logprobs(model: nn.Module, batch: RolloutBatch, rows: Tensor, config: GRPOConfig,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """completion_logprobs of the samples `rows` [M] of the batch: ([M, T], [M, T] | None)."""
    scores = batch_forward(model, batch, rows, config, with_entropy=with_entropy)
    return scores.logprobs, scores.entropy


@dataclass(frozen=True)
class DiffroInputs:
    """LossInputs' DiffRO fields for one micro-batch, and the reference's logprobs from the same forward
    (the GRPO KL term's, so it needs no pass of its own)."""

    diffro_reward: TokenReward  # the batch's reward, its rows renumbered to the micro-batch's samples
    completion_ids: Tensor  # [M, T]
    ref_logits: Tensor | None = None  # [M, T, V]; None when diffro_beta == 0
    ref_logprobs: Tensor | None = None  # [M, T]


def diffro_inputs(batch: RolloutBatch, rows: Tensor, reference: Reference | None, config: GRPOConfig,
                  bf16: bool) -> DiffroInputs:
    """The DiffRO inputs of the micro-batch `rows` [M]: the reference's logits and logprobs, and the reward."""
    if batch.diffro_reward is None:
        raise ValueError(f"loss {config.loss!r} needs RolloutBatch.diffro_reward (a token-input reward model); "
                         "the TTS job sets it from its token2reward checkpoint")
    ref_logits = ref_logprobs = None  # [M, T, V], [M, T]
    if config.diffro_beta > 0:
        if reference is None:
            raise ValueError("diffro_beta > 0 needs a reference (make_reference(policy)); or set diffro_beta=0")
        device = batch.completion_ids.device
        with torch.no_grad(), reference.active() as reference_model, \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ref_scores = batch_forward(reference_model, batch, rows, config, with_logits=True)
        ref_logits, ref_logprobs = ref_scores.logits, ref_scores.logprobs  # [M, T, V], [M, T]
    score = batch.diffro_reward.score

    def micro_batch_score(soft: Tensor, mask: Tensor, index: Tensor) -> Tensor:
        return score(soft, mask, rows[index])  # [b] the micro-batch's rows back to batch samples

    return DiffroInputs(diffro_reward=replace(batch.diffro_reward, score=micro_batch_score),
                        completion_ids=batch.completion_ids[rows], ref_logits=ref_logits, ref_logprobs=ref_logprobs)


@torch.no_grad()
def frozen_logprobs(model: nn.Module, batch: RolloutBatch, config: GRPOConfig, bf16: bool) -> Tensor:
    """Logprobs [N, T] of every sample, without gradient, a micro-batch at a time."""
    device = batch.completion_ids.device
    rows = torch.arange(batch.completion_ids.shape[0], device=device)  # [N]
    parts = []
    for chunk in rows.split(config.mini_batch_size):  # [M]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            parts.append(batch_logprobs(model, batch, chunk, config)[0])  # [M, T]
    return torch.cat(parts)  # [N, T]


class _MetricSum:
    """Token-weighted means of the loss metrics over micro-batches, kept on the device until the end."""

    def __init__(self) -> None:
        self.weighted: dict[str, Tensor] = {}
        self.tokens = torch.zeros(())

    def add(self, metrics: dict[str, Tensor]) -> None:
        tokens = metrics["tokens"]  # []
        self.tokens = self.tokens.to(tokens.device) + tokens
        for name, value in metrics.items():
            if name not in ("loss", "tokens"):
                total = self.weighted.get(name)
                self.weighted[name] = value * tokens if total is None else total + value * tokens

    def means(self) -> dict[str, float]:
        tokens = self.tokens.clamp(min=1)
        return {name: (total / tokens).item() for name, total in self.weighted.items()}


def grpo_update(policy: nn.Module, reference: Reference | None, optimizer: torch.optim.Optimizer,
                batch: RolloutBatch, config: GRPOConfig, *, shard_advantages: tuple[Tensor, Tensor] | None = None,
                all_reduce: Callable[[Tensor], Tensor] | None = None,
                before_optimizer_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One policy update on a scored rollout batch; returns metrics averaged over the update.

    Every optimizer step sees mini_batch_size * gradient_accumulation_steps samples (all of them
    when gradient_accumulation_steps is 0), in rollout order; the batch is passed over
    num_iterations times. reference may be None when config.kl_beta is 0.

    For one rank of a data-parallel update (distributed.grpo_update_distributed): shard_advantages
    are (advantages [N], scored [N]) of this shard's samples, computed on the full batch, and
    all_reduce sums a tensor over the ranks (for each step's normaliser Z).

    before_optimizer_step() runs before every optimizer step; an exception it raises ends the update
    there (the trainer's turn checks that its GPU lease is still held, jobs/turn.py).
    """
    policy.train()
    params = trainable_parameters(policy)
    device = params[0].device
    bf16 = use_bf16(config, device)
    batch = batch.to(device)
    samples = batch.completion_ids.shape[0]
    step_size = config.mini_batch_size * config.gradient_accumulation_steps or samples

    advantages, scored = shard_advantages or group_advantages(batch.rewards, batch.group_size, config.scale_rewards,
                                                              config.std_epsilon)  # [N], [N]
    advantages, scored = advantages.to(device), scored.to(device)  # [N], [N]
    mask = batch.completion_mask & scored[:, None]  # [N, T] unscored samples count nowhere

    # pi_old is the policy before this update. On-policy with a single optimizer step, every
    # micro-batch is scored before any weight changes, so its own detached logprobs are pi_old
    # (ratio exactly 1) and the extra forward is skipped; otherwise capture them now.
    on_policy = config.num_iterations == 1 and step_size >= samples
    old_logprobs = None if on_policy else frozen_logprobs(policy, batch, config, bf16)  # [N, T]
    loss_fn = LOSSES[config.loss]
    with_logits = config.loss in LOGIT_LOSSES  # DiffRO reads the full distributions, not only the sampled token
    # DiffRO's KL runs the reference on every micro-batch anyway: the GRPO KL's logprobs come from that pass.
    reference_per_micro_batch = with_logits and config.diffro_beta > 0
    ref_logprobs = None  # [N, T]
    if config.kl_beta > 0:
        if reference is None:
            raise ValueError("kl_beta > 0 needs a reference (make_reference(policy)); or set kl_beta=0")
        if not reference_per_micro_batch:
            with reference.active() as reference_model:
                ref_logprobs = frozen_logprobs(reference_model, batch, config, bf16)  # [N, T]

    totals, step_losses, grad_norms = _MetricSum(), [], []
    for _ in range(config.num_iterations):
        for step_rows in torch.arange(samples, device=device).split(step_size):  # [K]
            z = normalizer(mask[step_rows], config, all_reduce)  # [] Z over the whole optimizer step
            step_samples = mask[step_rows].any(1).sum().clamp(min=1)  # [] DiffRO's N: scored samples of the step
            step_loss = torch.zeros((), device=device)
            for rows in step_rows.split(config.mini_batch_size):  # [M]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    scores = batch_forward(policy, batch, rows, config, with_entropy=True, with_logits=with_logits)
                logprobs = scores.logprobs  # [M, T]
                diffro = diffro_inputs(batch, rows, reference, config, bf16) if with_logits else None
                micro_ref_logprobs = None  # [M, T]
                if config.kl_beta > 0:
                    micro_ref_logprobs = ref_logprobs[rows] if ref_logprobs is not None else \
                        diffro.ref_logprobs if diffro is not None else None
                inputs = LossInputs(
                    logprobs=logprobs,  # [M, T]
                    old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs[rows],  # [M, T]
                    ref_logprobs=micro_ref_logprobs,  # [M, T]
                    advantages=advantages[rows],  # [M]
                    mask=mask[rows],  # [M, T]
                    normalizer=z, entropy=scores.entropy, logits=scores.logits,  # [M, T, V] or None
                    sample_normalizer=step_samples,
                    ref_logits=None if diffro is None else diffro.ref_logits,  # [M, T, V]
                    diffro_reward=None if diffro is None else diffro.diffro_reward,
                    completion_ids=None if diffro is None else diffro.completion_ids)  # [M, T]
                loss, metrics = loss_fn(inputs, config)
                loss.backward()  # gradients add up over the micro-batches of the step
                step_loss += loss.detach()
                totals.add(metrics)
            max_norm = config.max_grad_norm or math.inf  # inf: measure the norm, clip nothing
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # [] a DTensor when FSDP shards the params
            grad_norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).detach())
            if before_optimizer_step is not None:
                before_optimizer_step()
            warm_up_learning_rate(optimizer, config)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(step_loss)

    # Metrics leave the device once, here: .item() inside the loop would sync every micro-batch.
    kept = advantages[scored]  # [N_scored]
    return {
        "loss": torch.stack(step_losses).mean().item(),  # per optimizer step
        **totals.means(),  # token-weighted over micro-batches: kl, clip_fraction, ratio_mean, entropy
        "grad_norm": torch.stack(grad_norms).mean().item(),  # before clipping
        "advantage_mean": kept.mean().item() if kept.numel() else 0.0,  # per scored sample
        "advantage_std": kept.std().item() if kept.numel() > 1 else 0.0,
        "optimizer_steps": float(len(step_losses)),
        "learning_rate": float(optimizer.param_groups[0]["lr"]),  # the last step's, under any warm-up
        "tokens": float(mask.sum().item()),  # counted completion tokens per pass
        **reward_statistics(batch.rewards, batch.group_size),
    }

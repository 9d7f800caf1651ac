"""Group-relative advantages: how much better each sample is than its siblings of the same prompt.

A rollout batch holds P prompts x G samples, in group order (sample i answers prompt i // G).
With r the (weighted) reward of each sample, the advantage of sample i in group g is

    scale_rewards="group":  A_i = (r_i - mean(r_g)) / (std(r_g) + eps)       GRPO (DeepSeekMath eq. 3)
    scale_rewards="batch":  A_i = (r_i - mean(r_g)) / (std(r_batch) + eps)   std over the whole batch
    scale_rewards="none":   A_i =  r_i - mean(r_g)                            Dr. GRPO (arXiv 2503.20783)

std is the sample (Bessel-corrected) standard deviation, as torch.std in TRL and verl.

Unscored samples: a reward of None means a scorer could not score the sample (the reward
contract). It is left out of its group's mean and std, gets advantage 0 and `scored=False`, and the
step masks it out of the loss and of the loss's normaliser, so it neither pushes the policy nor
dilutes the others. A failure never looks like a low score.

Groups without signal: when every scored reward of a group is the same (or fewer than two are
scored) there is nothing to compare, and the advantages are exactly 0 (not 0 / eps noise). Those
samples stay in the loss, where only the KL term acts on them, as in GRPO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from speechrl.trainer.core.config import RewardScaleName

Rewards = Sequence[float | None]


def _std(rewards: Tensor, scored: Tensor, dim: int | None = None) -> Tensor:
    """Sample std of the scored entries of rewards [P, G], per row (dim=1) or over all (None).

    Rows with fewer than two scored entries get 0.
    """
    dims = (dim,) if dim is not None else (0, 1)
    count = scored.sum(dims, keepdim=True)  # [P, 1] or [1, 1]
    mean = torch.where(scored, rewards, 0.0).sum(dims, keepdim=True) / count.clamp(min=1)  # [P, 1] or [1, 1]
    squares = torch.where(scored, (rewards - mean) ** 2, 0.0)  # [P, G]
    return (squares.sum(dims, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # [P, 1] or [1, 1]


# scale_rewards -> the divisor of (r - mean_group), from the rewards [P, G] (NaN where unscored),
# the scored mask [P, G] and eps; the result broadcasts against [P, G].
REWARD_SCALES: dict[RewardScaleName, Callable[[Tensor, Tensor, float], Tensor]] = {
    "group": lambda rewards, scored, eps: _std(rewards, scored, dim=1) + eps,  # [P, 1]
    "batch": lambda rewards, scored, eps: _std(rewards, scored) + eps,  # [1, 1]
    "none": lambda rewards, scored, eps: torch.ones(1, 1, dtype=rewards.dtype),  # [1, 1]
}


def _grouped(rewards: Rewards, group_size: int) -> tuple[Tensor, Tensor]:
    """rewards -> (values [P, G] float64 with NaN where unscored, scored [P, G] bool)."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}; the rollout batch "
                         f"must hold group_size samples of every prompt, in group order")
    # float64: the mean of equal rewards is exact more often, and the cost is nil at these sizes.
    values = torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float64)  # [N]
    values = values.view(-1, group_size)  # [P, G]
    return values, ~values.isnan()


def _no_signal(values: Tensor, scored: Tensor) -> Tensor:
    """[P, 1] True for groups whose scored rewards are all equal, or that have fewer than two scored."""
    highest = torch.where(scored, values, -math.inf).amax(1, keepdim=True)  # [P, 1]
    lowest = torch.where(scored, values, math.inf).amin(1, keepdim=True)  # [P, 1]
    return (highest == lowest) | (scored.sum(1, keepdim=True) < 2)  # [P, 1]


def group_advantages(rewards: Rewards, group_size: int, scale_rewards: RewardScaleName = "group",
                     eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Advantages of a rollout batch in group order; returns (advantages [N] float32, scored [N] bool).

    >>> advantages, scored = group_advantages([1.0, 2.0, 3.0, 5.0, 5.0, None], group_size=3, eps=0.0)
    >>> advantages.tolist(), scored.tolist()
    ([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [True, True, True, True, True, False])
    """
    values, scored = _grouped(rewards, group_size)  # [P, G], [P, G]
    count = scored.sum(1, keepdim=True)  # [P, 1]
    mean = torch.where(scored, values, 0.0).sum(1, keepdim=True) / count.clamp(min=1)  # [P, 1]
    centered = torch.where(scored, values - mean, 0.0)  # [P, G]
    advantages = centered / REWARD_SCALES[scale_rewards](values, scored, eps)  # [P, G]
    # Exact zeros where there is nothing to compare, not (r - mean) / eps rounding noise.
    advantages = torch.where(_no_signal(values, scored) | ~scored, 0.0, advantages)  # [P, G]
    return advantages.flatten().float(), scored.flatten()  # [N], [N]


def weighted_rewards(components: Mapping[str, Rewards], weights: Mapping[str, float]) -> list[float | None]:
    """r_i = sum_k w_k * r_k,i over the reward components; a component not in weights weighs 1.

    A sample is unscored (None) when any component with a non-zero weight is None for it;
    a zero weight keeps a component in the logs without letting it act.

    >>> weighted_rewards({"wer": [0.5, None, 1.0], "ins": [1.0, 0.0, None]}, {"wer": 2.0, "ins": 0.0})
    [1.0, None, 2.0]
    """
    lengths = {name: len(values) for name, values in components.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward components differ in length: {lengths}")
    unknown = sorted(set(weights) - set(components))
    if unknown:
        raise ValueError(f"reward_weights name {unknown}, which no reward component has; components: "
                         f"{sorted(components)}")
    total: list[float | None] = [0.0] * next(iter(lengths.values()), 0)
    for name, values in components.items():
        weight = weights.get(name, 1.0)
        if weight == 0:
            continue
        for i, value in enumerate(values):
            current = total[i]
            total[i] = None if value is None or current is None else current + weight * value
    return total


def reward_statistics(rewards: Rewards, group_size: int) -> dict[str, float]:
    """What to log about a batch's rewards: mean and std of the scored ones, the fraction unscored,
    and the fraction of groups that carry no signal (all scored rewards equal)."""
    values, scored = _grouped(rewards, group_size)  # [P, G], [P, G]
    flat = _no_signal(values, scored)  # [P, 1]
    kept = values[scored]  # [N_scored]
    return {
        "reward_mean": kept.mean().item() if kept.numel() else math.nan,
        "reward_std": kept.std().item() if kept.numel() > 1 else 0.0,
        "unscored_fraction": 1.0 - kept.numel() / max(values.numel(), 1),
        "zero_std_group_fraction": flat.double().mean().item() if flat.numel() else 0.0,
    }

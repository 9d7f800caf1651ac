"""Token2Reward as DiffRO's differentiable reward: the frozen model on the update's device, and the
TokenReward that reads a policy's speech-token range (core/diffro.py). The model itself is
speechrl.services.token2wav.token2reward; recipes/token2reward.py trains one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from speechrl.services.token2wav.token2reward import Token2Reward, left_align, load
from speechrl.trainer.core.losses import TokenReward


def load_frozen(folder: str | Path, device: str = "cpu") -> Token2Reward:
    """The Token2Reward of folder on device, its weights frozen (its input carries DiffRO's gradient, its weights none)."""
    model = load(folder, device=device)
    model.requires_grad_(False)
    return model


def diffro_reward(model: Token2Reward, texts: Sequence[str], speech_range: tuple[int, int],
                  stop_ids: Sequence[int] = ()) -> TokenReward:
    """DiffRO's reward from model for a policy whose speech ids are speech_range = [begin, begin + K).

    texts are the batch's target texts, one per sample (the score's rows index them);
    stop_ids are the other ids its rollout samples (EOS), which the KL covers and R never reads.
    """
    begin, end = speech_range
    if end - begin != model.config.num_tokens:
        raise ValueError(f"speech_range [{begin}, {end}) has {end - begin} ids; this Token2Reward embeds "
                         f"{model.config.num_tokens}")

    def score(soft: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        return model.log_prob_text(left_align(soft, mask), left_align(mask, mask), [texts[int(r)] for r in rows])

    return TokenReward(score=score, speech_range=(begin, end), stop_ids=tuple(stop_ids))

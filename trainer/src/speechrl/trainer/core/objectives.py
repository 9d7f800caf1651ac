"""The loss variants by name (GRPOConfig.loss), all with one signature:
(LossInputs, GRPOConfig) -> (loss, metrics).

A variant returns its micro-batch's scalar loss already divided by `inputs.normalizer` (so that
micro-batch losses add up to the step's loss) and detached scalar metrics, among them "tokens"
(the counted tokens, which weigh the metrics across micro-batches). To plug one in: add the
optional tensors it needs to LossInputs (losses.py), have step.py fill them, write
`def my_loss(inputs: LossInputs, config: GRPOConfig)`, add its name to config.LossName and add it
here. Variants compose: "grpo+diffro" is grpo_loss over all samples plus lambda times diffro_loss
over the samples with a positive advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from torch import Tensor

from speechrl.trainer.core.config import GRPOConfig, LossName
from speechrl.trainer.core.diffro import diffro_loss, grpo_diffro_loss
from speechrl.trainer.core.losses import LossInputs, Metrics, grpo_loss

LossFn = Callable[[LossInputs, GRPOConfig], tuple[Tensor, Metrics]]

LOSSES: dict[LossName, LossFn] = {
    "grpo": grpo_loss,
    "diffro": diffro_loss,
    "grpo+diffro": grpo_diffro_loss,
}

if set(LOSSES) != set(get_args(LossName)):  # the config accepts exactly the names implemented here
    raise RuntimeError(f"LOSSES has {sorted(LOSSES)}, GRPOConfig.loss allows {sorted(get_args(LossName))}")

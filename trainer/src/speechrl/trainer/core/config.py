"""GRPO configuration: one dataclass whose field help is the only documentation of every knob.

The same help text becomes the CLI flags and the job file's documentation (speechrl.services.config
turns flags, variables and a job's `grpo:` mapping into this class), and every broken invariant is a
ValueError from `__post_init__` that says what to change. The variants a field can name (`loss`,
`kl_estimator`, `loss_aggregation`, `scale_rewards`) are Literal types here; the registries that
implement them (losses.py, advantages.py) are keyed by the same names and import this module, never
the other way round. Defaults follow the ASR paper (arXiv 2509.18569): group size
12, 32 prompts per step, learning rate 1e-5, KL coefficient 0.1; the rest are the usual GRPO /
PPO defaults (clip 0.2, k3 KL, token-mean loss as in DAPO).

>>> config = GRPOConfig(batch_size=2, group_size=4, mini_batch_size=4)
>>> config.samples_per_batch, config.micro_batches_per_step
(8, 2)
>>> GRPOConfig(group_size=1)
Traceback (most recent call last):
...
ValueError: group_size must be >= 2 (advantages compare samples of the same prompt), got 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from speechrl.services.config import check_choices, option

LossName = Literal["grpo", "diffro", "grpo+diffro"]  # losses.LOSSES
LOGIT_LOSSES: frozenset[str] = frozenset({"diffro", "grpo+diffro"})  # variants that read the full distributions
KlEstimatorName = Literal["k1", "k2", "k3"]  # losses.KL_ESTIMATORS
AggregationName = Literal["token_mean", "sequence_mean", "constant"]  # losses.AGGREGATIONS
RewardScaleName = Literal["group", "batch", "none"]  # advantages.REWARD_SCALES
VARIANTS = {"loss": get_args(LossName), "kl_estimator": get_args(KlEstimatorName),
            "loss_aggregation": get_args(AggregationName), "scale_rewards": get_args(RewardScaleName)}

# Qwen2 / Llama projection names; "all-linear" (peft's shortcut) also works for other models.
QWEN2_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class GRPOConfig:
    """Every setting of a GRPO update. GPU settings are named in each help; defaults run on a CPU laptop."""

    # -- what a step samples
    group_size: int = option(12, "G: completions sampled per prompt; advantages compare samples of one prompt "
                                 "(the paper uses 12).")
    batch_size: int = option(32, "Prompts per step; a rollout batch is batch_size * group_size samples.")
    temperature: float = option(1.0, "Sampling temperature of the rollouts; logprobs are computed from "
                                     "logits / temperature so the ratio compares the distribution that sampled.")
    max_completion_length: int = option(256, "Most tokens per completion: the rollout's max_new_tokens and the "
                                             "normaliser of loss_aggregation=constant.")
    # -- rewards and advantages
    reward_weights: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Weight of each reward component by name, e.g. wer=1.0 hallucination=0.5; a component not "
                "named weighs 1.0. Every component is still logged."})
    scale_rewards: RewardScaleName = option("group", "Advantage scaling: group ((r - mean) / std within the group, GRPO), "
                                         "batch (std over the whole batch), none ((r - mean) only, Dr. GRPO).")
    std_epsilon: float = option(1e-4, "Added to the std before dividing, so near-identical groups stay finite.")
    # -- the loss
    loss: LossName = option("grpo", "Loss variant: grpo, diffro or grpo+diffro (losses.LOSSES).")
    clip_epsilon: float = option(0.2, "Lower clip range: the ratio is clipped to [1 - clip_epsilon, "
                                      "1 + clip_epsilon_high].")
    clip_epsilon_high: float | None = option(None, "Upper clip range; unset means clip_epsilon. DAPO's "
                                                    "clip-higher uses 0.28.")
    kl_beta: float = option(0.1, "beta: weight of the KL penalty to the frozen reference (the paper: 0.1). 0 skips "
                                 "the reference forward altogether.")
    kl_estimator: KlEstimatorName = option("k3", "Per-token KL estimator (Schulman's k1, k2, k3); k3 is GRPO's: unbiased, "
                                     ">= 0, low variance.")
    loss_aggregation: AggregationName = option("token_mean", "How per-token losses become one number: token_mean (every "
                                                 "token of the step weighs the same, DAPO), sequence_mean (mean "
                                                 "per sequence, then over sequences, the GRPO paper), constant "
                                                 "(sum / (sequences * max_completion_length), Dr. GRPO).")
    # -- DiffRO (loss "diffro" or "grpo+diffro"; diffro.py)
    diffro_tau: float = option(1.0, "Gumbel-Softmax temperature tau of DiffRO's relaxed tokens; lower is closer to "
                                    "one-hot and noisier in gradient.")
    diffro_hard: bool = option(False, "Straight-through Gumbel-Softmax: one-hot tokens forward, the soft "
                                      "distribution's gradient backward.")
    diffro_beta: float = option(0.1, "beta of DiffRO's sum_t KL(pi_theta(.|t) || pi_ref(.|t)) over the full token "
                                     "distributions; 0 skips the reference's logits.")
    diffro_lambda: float = option(1.0, "lambda: weight of the DiffRO term in grpo+diffro.")
    diffro_filter: bool = option(True, "grpo+diffro: the DiffRO term only over samples whose group advantage "
                                       "is > 0 (the sample filter); off for the ablation (every scored sample).")
    # -- the optimisation
    learning_rate: float = option(1e-5, "AdamW learning rate (the paper: 1e-5; LoRA usually wants ~1e-4).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_steps: int = option(0, "Optimizer steps over which the learning rate rises linearly to learning_rate "
                                  "(OpenRLHF's lr_warmup_ratio, verl's lr_warmup_steps). AdamW's first steps move "
                                  "every weight by the full rate whatever its gradient's size; on a noisy RL "
                                  "gradient that is a random jump. 0: the full rate from the first step.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this before each optimizer step; "
                                       "0 turns clipping off (the norm is still logged).")
    num_iterations: int = option(1, "mu: passes over one rollout batch. 1 is on-policy (ratio = 1 at the first "
                                    "micro-batch); more reuse samples, with the clip bounding the drift.")
    mini_batch_size: int = option(8, "Samples per forward/backward pass (a micro-batch); lower it when memory "
                                     "runs out: the update itself does not change.")
    gradient_accumulation_steps: int = option(0, "Micro-batches summed into one optimizer step. 0: the whole "
                                                 "rollout batch, one optimizer step per pass (on-policy). k > 0: "
                                                 "an optimizer step every k * mini_batch_size samples.")
    bf16: bool | None = option(None, "Run forwards under bfloat16 autocast (weights and optimizer stay fp32). "
                                     "Unset: on when the device supports it (CUDA with bf16), off on CPU.")
    seed: int = option(0, "Seed the trainer gives torch, numpy and python at the start of a run, and the rollout "
                          "service's sampling.")
    # -- LoRA
    lora: bool = option(False, "Train LoRA adapters instead of all weights; the reference is then the same "
                               "model with adapters switched off, so no second copy is held.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha; the adapter's output is scaled by alpha / r.")
    lora_dropout: float = option(0.0, "LoRA dropout; 0 keeps the ratio exactly 1 on-policy (dropout would make "
                                      "the recomputed logprobs differ from the sampled ones).")
    lora_target_modules: tuple[str, ...] = option(QWEN2_LINEAR_MODULES, "Module names that get adapters; "
                                                  "all-linear for every linear layer but the output head.")

    def __post_init__(self) -> None:
        self.lora_target_modules = tuple(self.lora_target_modules)
        _check(self.group_size >= 2, f"group_size must be >= 2 (advantages compare samples of the same prompt), "
                                     f"got {self.group_size}")
        for name in ("batch_size", "mini_batch_size", "num_iterations", "max_completion_length", "lora_r"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.gradient_accumulation_steps >= 0, f"gradient_accumulation_steps must be >= 0 (0: the whole "
                                                      f"rollout batch), got {self.gradient_accumulation_steps}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(0 < self.clip_epsilon < 1, f"clip_epsilon must be in (0, 1), got {self.clip_epsilon}")
        _check(self.clip_epsilon_high is None or self.clip_epsilon_high > 0,
               f"clip_epsilon_high must be > 0 or unset, got {self.clip_epsilon_high}")
        _check(self.diffro_tau > 0, f"diffro_tau must be > 0, got {self.diffro_tau}")
        for name in ("kl_beta", "diffro_beta", "diffro_lambda", "std_epsilon", "learning_rate", "weight_decay", "max_grad_norm", "lora_dropout"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check_choices(self)
        step = self.mini_batch_size * self.gradient_accumulation_steps
        _check(step == 0 or self.samples_per_batch % step == 0,
               f"batch_size * group_size ({self.samples_per_batch}) must be a multiple of mini_batch_size * "
               f"gradient_accumulation_steps ({step}) so every optimizer step sees as many samples; change one "
               f"of them, or set gradient_accumulation_steps=0 for one optimizer step per rollout batch")

    @property
    def samples_per_batch(self) -> int:
        """Samples in one rollout batch: batch_size * group_size."""
        return self.batch_size * self.group_size

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches whose gradients sum into one optimizer step (0 in the config resolved)."""
        if self.gradient_accumulation_steps:
            return self.gradient_accumulation_steps
        return -(-self.samples_per_batch // self.mini_batch_size)

    @property
    def clip_high(self) -> float:
        """The upper clip range in effect."""
        return self.clip_epsilon if self.clip_epsilon_high is None else self.clip_epsilon_high


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

"""GRPO updates on a tiny random Qwen2 built from a config (tiers 3 and 4): logprobs under any
padding, every trainable parameter moving, the rewarded completion gaining, LoRA against its
adapter-free reference, and gradient accumulation 1x8 against 8x1."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.policy import (
    apply_lora,
    completion_logprobs,
    make_optimizer,
    make_reference,
    plain_state,
)
from speechrl.trainer.core.step import RolloutBatch, batch_logprobs, grpo_update

VOCAB = 100


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


# Two prompts (the first padded on the left, the second full), four completions each, padded on
# the right; in each group one completion is rewarded above the others.
PROMPTS = torch.tensor([[0, 0, 3, 4, 5], [20, 21, 22, 23, 24]])
PROMPT_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
COMPLETIONS = torch.tensor([[30, 31, 32, 2], [40, 41, 2, 0], [50, 2, 0, 0], [60, 61, 62, 63],
                            [70, 71, 2, 0], [80, 81, 82, 2], [90, 2, 0, 0], [33, 34, 35, 36]])
COMPLETION_MASK = (torch.arange(4)[None] < torch.tensor([4, 3, 2, 4, 3, 4, 2, 4])[:, None]).long()
REWARDS: list[float | None] = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def rollout(rewards: list[float | None] = REWARDS) -> RolloutBatch:
    return RolloutBatch(completion_ids=COMPLETIONS, completion_mask=COMPLETION_MASK, rewards=rewards,
                        prompt_mask=PROMPT_MASK, prompt_ids=PROMPTS)


def settings(**overrides: object) -> GRPOConfig:
    values: dict = {"batch_size": 2, "group_size": 4, "mini_batch_size": 4, "learning_rate": 1e-3}
    return GRPOConfig(**{**values, **overrides})


def naive_logprobs(model: Qwen2ForCausalLM, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """One unpadded sequence, full logits, log_softmax: the ground truth."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # [T, V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@torch.no_grad()
def test_completion_logprobs_ignore_padding_on_either_side() -> None:
    model = tiny_model().eval()
    prompts = [[3, 4, 5], [20, 21, 22, 23, 24]]
    completions = [[30, 31, 2], [40]]
    expected = [naive_logprobs(model, p, c) for p, c in zip(prompts, completions, strict=True)]
    # prompts padded on the right, completions on the left: the packing must undo both
    prompt_ids = torch.tensor([[3, 4, 5, 99, 99], [20, 21, 22, 23, 24]])
    prompt_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    completion_ids = torch.tensor([[30, 31, 2], [-100, -100, 40]])
    completion_mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    logprobs, entropy = completion_logprobs(model, completion_ids, completion_mask, prompt_ids=prompt_ids,
                                            prompt_mask=prompt_mask, with_entropy=True)
    torch.testing.assert_close(logprobs[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logprobs[1, 2:], expected[1], atol=1e-5, rtol=1e-5)
    assert logprobs[1, :2].tolist() == [0.0, 0.0]
    assert entropy is not None and (entropy[0] > 0).all() and entropy[1, 0] == 0
    # the same prompts as input embeddings (how an LLM-ASR feeds audio embeddings + instruction)
    embeds = model.get_input_embeddings()(prompt_ids.clamp(max=VOCAB - 1))
    from_embeds, _ = completion_logprobs(model, completion_ids, completion_mask, prompt_embeds=embeds,
                                         prompt_mask=prompt_mask)
    torch.testing.assert_close(from_embeds, logprobs, atol=1e-5, rtol=1e-5)


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def completion_scores(model: torch.nn.Module, batch: RolloutBatch, config: GRPOConfig) -> torch.Tensor:
    logprobs, _ = batch_logprobs(model, batch, torch.arange(8), config)  # [8, T]
    return logprobs.sum(1)  # [8] log pi(completion | prompt)


def test_grpo_updates_move_every_parameter_and_favour_the_rewarded_completion() -> None:
    model, config, batch = tiny_model(), settings(), rollout()
    reference, optimizer = make_reference(model), make_optimizer(model, config)
    before, start = trainable_snapshot(model), completion_scores(model, batch, config)
    history = [grpo_update(model, reference, optimizer, batch, config) for _ in range(4)]
    after = completion_scores(model, batch, config)

    moved = {name: not torch.equal(value, dict(model.named_parameters())[name]) for name, value in before.items()}
    assert all(moved.values()), [name for name, ok in moved.items() if not ok]
    assert all(math.isfinite(v) for metrics in history for v in metrics.values()), history
    assert history[0]["ratio_mean"] == 1.0 and history[0]["clip_fraction"] == 0.0  # on-policy
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7) and history[-1]["kl"] > 0  # drifts from pi_ref
    gain = after - start  # [8]
    assert gain[0] > gain[1:4].max() and gain[6] > gain[[4, 5, 7]].max()  # each group's winner gained most
    # the reference did not move
    torch.testing.assert_close(completion_scores(reference.model, batch, config),
                               start, atol=1e-5, rtol=1e-5)


def test_lora_moves_only_adapters_and_its_reference_stays_the_base_model() -> None:
    config = settings(lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2)
    model = apply_lora(tiny_model(), config)
    reference = make_reference(model)
    assert reference.adapters_off and reference.model is model  # no second copy
    batch = rollout()
    every = {name: p.detach().clone() for name, p in model.named_parameters()}
    with reference.active() as base:
        ref_before = completion_scores(base, batch, config)
    policy_before = completion_scores(model, batch, config)
    optimizer = make_optimizer(model, config)
    for _ in range(3):
        metrics = grpo_update(model, reference, optimizer, batch, config)
    assert all(math.isfinite(v) for v in metrics.values())

    for name, p in model.named_parameters():
        changed = not torch.equal(every[name], p)
        assert changed == ("lora_" in name), name  # adapters (A and B) moved, nothing else did
    with reference.active() as base:
        torch.testing.assert_close(completion_scores(base, batch, config), ref_before)
    assert not torch.allclose(completion_scores(model, batch, config), policy_before)


def test_plain_state_merges_as_peft_does_without_touching_the_training_model() -> None:
    config = settings(lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2)
    model = apply_lora(tiny_model(), config)
    optimizer = make_optimizer(model, config)
    grpo_update(model, make_reference(model), optimizer, rollout(), config)  # B != 0: the adapters now act
    before = {name: t.clone() for name, t in model.state_dict().items()}
    merged = plain_state(model, merge=True)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() == tiny_model().state_dict().keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(merged[name], tensor) for name, tensor in tiny_model().state_dict().items())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items()), "the training model moved"
    base = plain_state(model, merge=False)  # what a full push of a LoRA model sends: the warm start
    assert all(torch.equal(base[name], tensor) for name, tensor in tiny_model().state_dict().items())


def test_gradient_accumulation_1x8_equals_8x1_and_ragged_micro_batches() -> None:
    # SGD, not Adam: Adam's first step is ~lr * sign(g) and would hide a wrongly scaled gradient.
    batch, updated = rollout(), []
    for mini, accumulation in ((8, 1), (1, 8), (3, 0)):  # (3, 0): micro-batches of 3, 3, 2 in one step
        model = tiny_model()
        config = settings(mini_batch_size=mini, gradient_accumulation_steps=accumulation, kl_beta=0.1)
        reference = make_reference(model)
        grpo_update(model, reference, torch.optim.SGD(model.parameters(), lr=0.1), batch, config)
        updated.append(dict(model.named_parameters()))
    start = dict(tiny_model().named_parameters())
    assert not torch.equal(updated[0]["lm_head.weight"], start["lm_head.weight"])
    for other in updated[1:]:
        for name, p in updated[0].items():
            torch.testing.assert_close(other[name], p, atol=1e-6, rtol=1e-5, msg=name)


def test_several_optimizer_steps_and_iterations_go_off_policy() -> None:
    model, batch = tiny_model(), rollout()
    config = settings(mini_batch_size=2, gradient_accumulation_steps=2, num_iterations=2, clip_epsilon=0.01,
                      learning_rate=1e-2)
    metrics = grpo_update(model, make_reference(model), make_optimizer(model, config), batch, config)
    assert metrics["optimizer_steps"] == 4  # 8 samples / (2 * 2) per step, twice
    assert metrics["ratio_mean"] != 1.0 and metrics["clip_fraction"] > 0  # pi_old was captured before step 1


def test_learning_rate_warms_up_per_optimizer_step_and_resumes_where_it_was() -> None:
    """warmup_steps: the k-th optimizer step runs at k / warmup_steps of the rate, counted from the
    optimizer's own state, so a run resumed from its optimizer.pt carries on where it stopped."""
    config = settings(mini_batch_size=2, gradient_accumulation_steps=2, warmup_steps=4, learning_rate=1e-2,
                      kl_beta=0.0)  # 2 optimizer steps per update
    model = tiny_model()
    optimizer = make_optimizer(model, config)
    assert grpo_update(model, None, optimizer, rollout(), config)["learning_rate"] == pytest.approx(2 / 4 * 1e-2)
    resumed = make_optimizer(model, config)
    resumed.load_state_dict(optimizer.state_dict())
    assert grpo_update(model, None, resumed, rollout(), config)["learning_rate"] == pytest.approx(1e-2)
    # the first step itself is smaller: AdamW's first step moves each weight by ~lr whatever its gradient
    moved = {}
    for warmup in (0, 4):
        model = tiny_model()
        start = trainable_snapshot(model)
        one_step = settings(warmup_steps=warmup, learning_rate=1e-2, kl_beta=0.0)
        grpo_update(model, None, make_optimizer(model, one_step), rollout(), one_step)
        moved[warmup] = max((p - start[name]).abs().max().item() for name, p in trainable_snapshot(model).items())
    assert moved[4] == pytest.approx(moved[0] / 4, rel=0.05)


def test_unscored_samples_are_left_out_and_bf16_autocast_runs() -> None:
    model, config = tiny_model(), settings(bf16=True, kl_beta=0.0)
    rewards = [1.0, None, 0.0, 0.0, None, None, None, None]
    metrics = grpo_update(model, None, make_optimizer(model, config), rollout(rewards), config)
    assert metrics["tokens"] == 4 + 2 + 4  # samples 0, 2 and 3 only
    assert metrics["unscored_fraction"] == 5 / 8 and metrics["zero_std_group_fraction"] == 0.5
    assert all(math.isfinite(v) for v in metrics.values())


def test_reference_copy_is_frozen_and_independent() -> None:
    model = tiny_model()
    reference = make_reference(model)
    assert not reference.adapters_off and reference.model is not model and not reference.model.training
    assert all(not p.requires_grad for p in reference.model.parameters())
    with pytest.raises(ValueError, match="needs a reference"):
        grpo_update(model, None, make_optimizer(model, settings()), rollout(), settings())


def test_grpo_plus_diffro_runs_the_reference_once_per_micro_batch() -> None:
    """DiffRO's KL needs the reference's full logits on every micro-batch; the GRPO KL's logprobs come
    from that same forward, not from a second pass over the batch."""
    from speechrl.trainer.core.losses import TokenReward

    model = tiny_model()
    reference = make_reference(model)
    forwards = []
    reference.model.register_forward_hook(lambda *_: forwards.append(1))

    def reward(soft: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (soft[..., 0] * mask).sum(-1)  # [b] differentiable in the relaxed tokens

    batch = RolloutBatch(completion_ids=COMPLETIONS, completion_mask=COMPLETION_MASK, rewards=REWARDS,
                         prompt_mask=PROMPT_MASK, prompt_ids=PROMPTS,
                         diffro_reward=TokenReward(score=reward, speech_range=(30, VOCAB), stop_ids=(2,)))
    config = settings(loss="grpo+diffro", kl_beta=0.1, diffro_beta=0.1, num_iterations=2)
    metrics = grpo_update(model, reference, make_optimizer(model, config), batch, config)
    micro_batches = COMPLETIONS.shape[0] // config.mini_batch_size
    assert len(forwards) == micro_batches * config.num_iterations  # was + one more pass over the batch
    assert metrics["kl"] > 0  # the second iteration's policy has moved away from the reference

"""The policy as the loss sees it: per-token logprobs of sampled completions under a HF causal LM.

A prompt is token ids (a text LLM, an LLM-TTS) or input embeddings (an LLM-ASR: the audio
encoder's embeddings followed by the instruction's token embeddings); the completion is always
token ids. One forward scores a whole micro-batch, whatever the padding of either part.

The reference pi_ref is a frozen copy of the starting policy (`make_reference`), or, with LoRA,
the same model with its adapters switched off, so that LoRA training holds one set of weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.losses import token_entropy, token_logprobs


def _pack_left(mask: Tensor) -> Tensor:
    """The permutation [B, L] that moves every row's padding to the left, keeping the order of its tokens.

    A stable sort of the 0/1 mask: pads (0) first, then the real positions in their order. Prompts
    padded on the right, completions padded on the right or left, or holes in the middle all come
    out as one contiguous left-padded sequence, which is what a causal LM scores correctly.
    """
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # [B, L]


def completion_logprobs(model: nn.Module, completion_ids: Tensor, completion_mask: Tensor, *,
                        prompt_mask: Tensor, prompt_ids: Tensor | None = None,
                        prompt_embeds: Tensor | None = None, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log pi(o_t | q, o_<t) of every completion token, in one forward; returns ([B, T], [B, T] | None).

    completion_forward with the logits dropped; see there for the arguments.
    """
    scores = completion_forward(model, completion_ids, completion_mask, prompt_mask=prompt_mask, prompt_ids=prompt_ids,
                                prompt_embeds=prompt_embeds, temperature=temperature, with_entropy=with_entropy)
    return scores.logprobs, scores.entropy


@dataclass(frozen=True)
class CompletionScores:
    """What one forward over prompt + completion gives the losses."""

    logprobs: Tensor  # [B, T] log pi of each completion token (temperature applied), 0 on padding
    entropy: Tensor | None  # [B, T] per-token entropy, no gradient; None unless asked for
    logits: Tensor | None  # [B, T, V] raw logits predicting each completion position (DiffRO); None unless asked for


def completion_forward(model: nn.Module, completion_ids: Tensor, completion_mask: Tensor, *,
                       prompt_mask: Tensor, prompt_ids: Tensor | None = None,
                       prompt_embeds: Tensor | None = None, temperature: float = 1.0,
                       with_entropy: bool = False, with_logits: bool = False) -> CompletionScores:
    """log pi(o_t | q, o_<t) of every completion token in one forward, optionally its entropy and logits.

    completion_ids [B, T], completion_mask [B, T] (1 on sampled tokens); the prompt as exactly one
    of prompt_ids [B, S] or prompt_embeds [B, S, H], with prompt_mask [B, S] (every row needs at
    least one prompt position: the first completion token is predicted from it). Logits are divided
    by the sampling temperature. Padded positions of the result are 0. The second result is the
    per-token entropy (no gradient) when with_entropy, else None; logits [B, T, V] (the raw logits
    at each completion token, in the caller's layout, carrying the gradient) when with_logits.

    The model must accept `logits_to_keep` (every HF causal LM since transformers 4.45): only the
    last T + 1 positions go through the output head, never the prompt's.
    """
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt_ids and prompt_embeds")
    batch, length = completion_ids.shape
    completion_mask = completion_mask.bool()  # [B, T]
    mask = torch.cat([prompt_mask.bool(), completion_mask], dim=1)  # [B, S + T]
    order = _pack_left(mask)  # [B, S + T]
    # Pad ids may be anything (-100, the pad id); 0 is always a valid row of the embedding table.
    safe_completion = completion_ids.masked_fill(~completion_mask, 0)  # [B, T]
    # The ids each position predicts; the prompt's are placeholders that the mask drops.
    targets = torch.cat([torch.zeros_like(prompt_mask, dtype=completion_ids.dtype), safe_completion], 1)  # [B, S+T]
    targets = targets.gather(1, order)[:, -length:]  # [B, T] the last T packed positions
    attention = mask.gather(1, order).long()  # [B, S + T] left-padded
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # [B, S + T] 0 at each row's first real token

    if prompt_embeds is not None:
        embedding = cast(Any, model).get_input_embeddings()  # nn.Embedding (a HF or peft model)
        completion_embeds = embedding(safe_completion)  # [B, T, H]
        embeds = torch.cat([prompt_embeds.to(completion_embeds.dtype), completion_embeds], dim=1)  # [B, S+T, H]
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))  # [B, S + T, H]
        inputs = {"inputs_embeds": embeds}
    else:
        assert prompt_ids is not None
        ids = torch.cat([prompt_ids.masked_fill(~prompt_mask.bool(), 0), safe_completion], dim=1)  # [B, S + T]
        inputs = {"input_ids": ids.gather(1, order)}
    output = model(**inputs, attention_mask=attention, position_ids=positions, logits_to_keep=length + 1,
                   use_cache=False)
    logits = output.logits[:, :-1]  # [B, T, V] position k predicts packed token k + 1

    # Back from the packed window (each completion right-aligned in it) to the caller's layout:
    # the r-th sampled token of a row with n of them sits at window index T - n + r.
    rank = completion_mask.long().cumsum(1) - 1  # [B, T]
    index = (length - completion_mask.sum(1, keepdim=True) + rank).clamp(0, length - 1)  # [B, T]
    logprobs = token_logprobs(logits, targets, temperature).gather(1, index)  # [B, T]
    logprobs = logprobs.masked_fill(~completion_mask, 0.0)  # [B, T]
    entropy = None
    if with_entropy:
        entropy = token_entropy(logits, temperature).gather(1, index).masked_fill(~completion_mask, 0.0)  # [B, T]
    aligned = None
    if with_logits:
        aligned = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))  # [B, T, V] caller's layout
    return CompletionScores(logprobs, entropy, aligned)


@dataclass
class Reference:
    """The frozen reference policy pi_ref. Use it as `with reference.active() as model: ...`."""

    model: nn.Module
    adapters_off: bool  # True: a LoRA policy itself, scored with its adapters switched off

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The reference model, ready to score (for LoRA: adapters off until the block ends)."""
        if self.adapters_off:
            assert isinstance(self.model, PeftModel)
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model


def make_reference(model: nn.Module) -> Reference:
    """pi_ref for a policy at the start of training.

    A LoRA policy (a peft model) is its own reference with the adapters disabled: no copy, and
    exactly the base weights. Any other model is deep-copied, frozen (requires_grad False) and put
    in eval mode; the copy costs one more set of weights on the device.
    """
    if isinstance(model, PeftModel):
        return Reference(model, adapters_off=True)
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return Reference(reference, adapters_off=False)


def apply_lora(model: nn.Module, config: GRPOConfig) -> PeftModel:
    """Wrap a causal LM in LoRA adapters (peft) on config.lora_target_modules; only the adapters train."""
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear" if targets == ("all-linear",) else list(targets),
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    assert isinstance(peft_model, PeftModel)
    return peft_model


def plain_state(model: PeftModel, merge: bool) -> dict[str, Tensor]:
    """The state dict of the model under model's LoRA adapters, by that model's own tensor names: its base
    weights (merge False: the tensors themselves, detached) or, with merge, copies on the CPU with the
    active adapters folded in (W + alpha / r * B A).

    Read off the training model without touching it: peft's merge_adapter / unmerge_adapter round trip
    would add and subtract the delta in place and leave the base weights (the LoRA reference) a rounding
    error away from the warm start's.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {name.replace(".base_layer.", "."): tensor.detach() for name, tensor in base.state_dict().items()
             if ".lora_" not in name}
    if not merge:
        return state
    state = {name: tensor.to("cpu", copy=True) for name, tensor in state.items()}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = f"{name}.weight"
                    delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]  # on each concrete layer
                    state[key] += delta.detach().to("cpu", state[key].dtype)
    return state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (all of them, or the LoRA adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, config: GRPOConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with config.learning_rate and weight_decay."""
    return torch.optim.AdamW(trainable_parameters(model), lr=config.learning_rate,
                             weight_decay=config.weight_decay)


def warm_up_learning_rate(optimizer: torch.optim.Optimizer, config: GRPOConfig) -> None:
    """Set the rate of the coming optimizer step under config.warmup_steps' linear warm-up. The steps taken
    are read from AdamW's own state, so a resumed run (optimizer.pt) and every FSDP rank continue alike."""
    if config.warmup_steps <= 0:
        return
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if p in optimizer.state]
    taken = int(states[0]["step"]) if states and "step" in states[0] else 0
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * min(1.0, (taken + 1) / config.warmup_steps)


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, *, max_grad_norm: float = 1.0,
                    schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One update on a supervised loss (warm starts, Token2Reward): backward, clip, step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return loss.item()

"""Token sampling for the transformers backend, row-wise parameters in one batch.

Mirrors vLLM's V1 sampler so the two backends mean the same thing: allowed-token mask, then
temperature, then top-k and top-p (vLLM's apply_top_k_top_p); a token is drawn by the exponential
race argmax(p / q), q ~ Exp(1) from the row's own generator; the reported logprob is the
log-softmax of the processed logits (vLLM's "processed_logprobs"). Greedy rows take the argmax of
the masked logits and report their log-softmax at temperature 1.

>>> import torch
>>> logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
>>> rows = RowParams.build([0.0, 1.0], [0, 1], [1.0, 1.0], [None, [0, 1]], vocab_size=3, device="cpu")
>>> gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
>>> ids, logprobs = sample(logits, rows, gens)
>>> ids.tolist(), round(float(logprobs[1]), 4)
([2, 1], 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RowParams:
    """Sampling parameters of every row of a batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # [R] float32, 0 for greedy rows
    top_k: torch.Tensor  # [R] int64, vocab_size when off
    top_p: torch.Tensor  # [R] float32, 1 when off
    allowed: torch.Tensor | None  # [R, V] bool, None when every row may take any token

    @staticmethod
    def build(temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
              allowed: Sequence[Sequence[int] | None], vocab_size: int, device: str | torch.device) -> RowParams:
        """Row tensors from per-row values; top_k 0 means off; allowed None means the whole vocabulary."""
        k = [vocab_size if value <= 0 else min(value, vocab_size) for value in top_k]
        mask = None
        if any(ids is not None for ids in allowed):
            mask = torch.ones(len(allowed), vocab_size, dtype=torch.bool)  # [R, V]
            for row, ids in enumerate(allowed):
                if ids is not None:
                    mask[row] = False
                    mask[row, torch.as_tensor(list(ids), dtype=torch.long)] = True
            mask = mask.to(device)
        return RowParams(torch.tensor(temperature, dtype=torch.float32, device=device),
                         torch.tensor(k, dtype=torch.long, device=device),
                         torch.tensor(top_p, dtype=torch.float32, device=device), mask)


def top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Logits with tokens outside each row's top-k and top-p set to -inf (vLLM's rule)."""
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1, descending=False)  # [R, V] ascending
    kth = ordered.gather(1, (vocab - k).clamp(0, vocab - 1).unsqueeze(1))  # [R, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    drop = cumulative <= (1 - p).unsqueeze(1)  # the low tail holding 1 - p of the mass
    drop[:, -1] = False  # always keep the most likely token
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def sample(logits: torch.Tensor, rows: RowParams,
           generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [R] and their logprobs [R] (float32) from last-position logits [R, V]."""
    logits = logits.float()  # [R, V]
    if rows.allowed is not None:
        logits = logits.masked_fill(~rows.allowed, float("-inf"))
    greedy = rows.temperature == 0  # [R]
    temperature = torch.where(greedy, torch.ones_like(rows.temperature), rows.temperature)
    processed = logits / temperature.unsqueeze(1)  # [R, V]
    # Greedy rows keep the full (masked) distribution, as in vLLM's mixed batches.
    k = torch.where(greedy, torch.full_like(rows.top_k, logits.shape[-1]), rows.top_k)
    p = torch.where(greedy, torch.ones_like(rows.top_p), rows.top_p)
    if bool((k < logits.shape[-1]).any() or (p < 1).any()):
        processed = top_k_top_p(processed, k, p)
    logprobs = processed.log_softmax(dim=-1)  # [R, V]
    noise = torch.empty_like(processed)  # [R, V]
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    drawn = (logprobs.exp() / noise).argmax(dim=-1)  # [R]
    ids = torch.where(greedy, logits.argmax(dim=-1), drawn)  # [R]
    return ids, logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)

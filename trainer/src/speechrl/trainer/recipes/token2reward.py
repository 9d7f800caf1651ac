"""Training of Token2Reward, DiffRO's token-input ASR reward model. The model is
speechrl.services.token2wav.token2reward (the token2wav service serves it too); its use as DiffRO's
differentiable reward is speechrl.trainer.models.token2reward.

Train it on (tokens, text) pairs, one JSON object a line, {"tokens": [ids in 0..K-1], "text": "..."}:

    python -m speechrl.trainer.recipes.token2reward --data pairs.jsonl --out runs/token2reward --steps 300
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from speechrl.services.token2wav.token2reward import Token2Reward, Token2RewardConfig, pad, save
from speechrl.trainer.core.policy import supervised_step


def train(pairs: Sequence[tuple[Sequence[int], str]], config: Token2RewardConfig, *, steps: int = 300,
          batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 0,
          log: Callable[[int, float], None] | None = None,
          augment: Callable[[Sequence[int], random.Random], list[int]] | None = None) -> Token2Reward:
    """Fit a Token2Reward on (token ids, text) pairs by CTC; returns it in eval mode.

    augment(tokens, rng), when given, rewrites each drawn pair's tokens afresh every time it is drawn
    (the text stays): training on the tokens a policy samples (its voice tokens, its substitutions and
    drops) rather than only clean ones, so log P(text | tokens) is calibrated where DiffRO reads it.
    """
    if not pairs:
        raise ValueError("train needs at least one (tokens, text) pair")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Token2Reward(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(min(batch_size, len(pairs)))]
        tokens, mask = pad([augment(t, rng) if augment else list(t) for t, _ in chosen])  # [B, T], [B, T]
        loss = -model.log_prob_text(tokens, mask, [text for _, text in chosen]).mean()  # []
        value = supervised_step(model, optimizer, loss, schedule=schedule)
        if log is not None:
            log(step, value)
    return model.eval()


def read_pairs(path: str | Path) -> list[tuple[list[int], str]]:
    """(tokens, text) pairs of a JSON-lines file with "tokens" and "text" on each line."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if "tokens" not in row or "text" not in row:
                raise ValueError(f"{path}:{number}: each line needs \"tokens\" and \"text\"")
            pairs.append(([int(t) for t in row["tokens"]], str(row["text"])))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a Token2Reward (speech tokens -> text by CTC).")
    parser.add_argument("--data", required=True, help="JSON lines of {\"tokens\": [...], \"text\": \"...\"}")
    parser.add_argument("--out", required=True, help="Folder to write token2reward.pt into.")
    parser.add_argument("--num-tokens", type=int, default=0, help="K, the speech-token ids; 0: max id in data + 1.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--upsample", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = read_pairs(args.data)
    num_tokens = args.num_tokens or max(max(t, default=0) for t, _ in pairs) + 1
    longest = max(len(t) for t, _ in pairs)
    config = Token2RewardConfig(num_tokens=num_tokens, d_model=args.d_model, layers=args.layers,
                                upsample=args.upsample, max_tokens=max(512, longest))

    def log(step: int, loss: float) -> None:
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} ctc {loss:.3f}", flush=True)

    model = train(pairs, config, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                  seed=args.seed, log=log)
    print(f"saved {save(model, args.out)}")


if __name__ == "__main__":
    main()

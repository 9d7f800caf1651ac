"""Plots of a training run: reward and WER over steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_run(rows: Sequence[dict[str, Any]], path: Path, components: Mapping[str, str]) -> Path:
    """Reward (total, and each of components: metric key -> label) and WER (train rollouts, greedy
    eval) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in {"reward_mean": "total", **components}.items():
        if any(key in r for r in rows):
            left.plot(steps, [r.get(key) for r in rows], label=label, marker="." if key == "reward_mean" else None)
    left.set_xlabel("step")
    left.set_ylabel("mean reward of the rollouts")
    left.legend()
    left.set_title("Rewards")
    right.plot(steps, [r.get("wer") for r in rows], label="rollout WER (sampled)")
    evals = [r for r in rows if "eval/wer" in r]
    if evals:
        right.plot([r["step"] for r in evals], [r["eval/wer"] for r in evals], "o-", label="eval WER (greedy)")
    right.set_xlabel("step")
    right.set_ylabel("WER")
    right.legend()
    right.set_title("Word error rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The main job (`make demo`): a short RL run for the LLM-ASR, end to end through the services.

    speechrl demo [--out runs/demo]

The small version of reproduce.py: speak a corpus with espeak-ng, warm-start a small LLM-ASR,
start the services (rules, encoder, rollout), pick the RL prompts whose sampled transcripts the warm
start is unsure of, run GRPO with R1+R2 for a few steps, evaluate the warm start and the trained
policy on test and long segments, and write results.md, results.png and the run's training.png. About 5 minutes on 2 cores (the corpus and warm start are reused on
a second run). `python -m speechrl.trainer.recipes.reproduce` runs the full table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from speechrl.trainer.recipes.reproduce import ReproConfig, run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechrl demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["demo"])
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=20, help="GRPO steps (default: 20)")
    args = parser.parse_args(argv)
    run(ReproConfig(out=args.out, variants="R1+R2", train=500, joined=120, test=40, long_test=8, long_train=16, rl_pool=64,
                    warmstart_epochs=4, hidden_size=192, num_layers=3, steps=args.steps, prompt_candidates=48,
                    long_candidates=8, prompt_pool=32))

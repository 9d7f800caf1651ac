"""The main job (`make demo`): a short RL run for the LLM-ASR, end to end through the services.

    speechrl demo [--out runs/demo] [--seeds 0,1,2]

The small version of reproduce.py: speak a corpus with espeak-ng, warm-start a small LLM-ASR,
start the services (rules, encoder, rollout), pick the RL prompts whose sampled transcripts the warm
start is unsure of (recorded utterances with silence around them, tight-cut ones and long segments),
run GRPO with R1+R2 once per seed from that warm start, evaluate the warm start and every run on test
and long segments, and check the paper's direction: long-segment insertions lower than the warm
start's in every seed, and test WER not above the warm start's by more than the spread between
seeds. Writes results.md (the table, the mean and spread over seeds, the checks), results.png and
each run's training.png. 5 to 9 minutes on 2 cores (the corpus and warm start are reused on a
second run). `python -m speechrl.trainer.recipes.reproduce` runs the full table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speechrl.trainer.recipes.reproduce import BASELINE, ReproConfig, run

VARIANT = "R1+R2"
# (metric, words): the columns the paper's direction is checked on; lower is better in each
TEST_COLUMNS = (("test_recorded/wer", "test WER, recorded"), ("test/wer", "test WER, tight"))


def direction_checks(results: dict[str, Any], variant: str = VARIANT) -> list[tuple[bool, str]]:
    """The paper's direction on this run's table, one (held, sentence) per check: long-segment insertions
    below the warm start's in every seed; each test WER's mean not above the warm start's by more than
    the spread between seeds (one seed: not above at all)."""
    table, base = results["table"], results["table"][BASELINE]
    runs = {label: scores for label, scores in table.items() if label.split(", seed ")[0] == variant}
    lower = [label for label, scores in runs.items() if scores["long/insertions"] < base["long/insertions"]]
    checks = [(len(lower) == len(runs),
               f"long-segment insertions per segment below the warm start's {base['long/insertions']:.2f} in "
               f"{len(lower)} of {len(runs)} runs ("
               + ", ".join(f"{scores['long/insertions']:.2f}" for scores in runs.values()) + ")")]
    summary = results["over_seeds"].get(variant) or {key: (runs[variant][key], 0.0) for key, _ in TEST_COLUMNS}
    for key, words in TEST_COLUMNS:
        mean, spread = summary[key]
        held = mean - base[key] <= spread
        checks.append((held, f"{words}: {mean:.3f} ± {spread:.3f} against the warm start's {base[key]:.3f} "
                             + ("(lower)" if mean < base[key] else "(higher, within the spread)" if held
                                else "(higher by more than the spread)")))
    return checks


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechrl demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["demo"])
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=25, help="GRPO steps per seed (default: 25)")
    parser.add_argument("--seeds", default="0,1,2", help="GRPO seeds, comma-separated (default: 0,1,2)")
    args = parser.parse_args(argv)
    results = run(ReproConfig(out=args.out, variants=VARIANT, seeds=args.seeds, train=500, joined=120, test=40,
                              long_test=8, long_train=16, rl_pool=64, warmstart_epochs=4, hidden_size=192,
                              num_layers=3, steps=args.steps, prompt_candidates=48, tight_candidates=16,
                              long_candidates=8, long_dev=4, prompt_pool=32, accuracy_floor=-1.0,
                              learning_rate=3e-5, kl_beta=0.1))
    checks = direction_checks(results)
    text = "\nThe paper's direction (GRPO with R1 + R2 against the warm start):\n\n" + "".join(
        f"- {'holds' if held else 'DOES NOT HOLD'}: {sentence}\n" for held, sentence in checks)
    print(text)
    with (Path(args.out) / "results.md").open("a") as results_md:
        results_md.write(text)

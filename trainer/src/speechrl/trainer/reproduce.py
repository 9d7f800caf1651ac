"""The ASR paper's reward ablation at small scale, on this CPU, through the real services.

    python -m speechrl.trainer.reproduce --out runs/asr-repro          # the table (~15 min on 2 cores)
    speechrl demo                                                       # the short version (main job)

1. An English corpus spoken by espeak-ng (data.py): train/dev/test plus long test segments.
2. A supervised warm start of a small LLM-ASR (warmstart.py): tiny.en's encoder + a small Qwen2,
   stopped early so RL has room.
3. The local stack (rules, encoder with the policy's front-end, rollout with the policy).
4. One GRPO run per reward set, each from the same warm start: R1 (1 - WER), R1+R2 (+ hallucination
   penalty), R1+R2+R3 (+ keyword precision/recall).
5. Greedy evaluation of the warm start and of every run on the test split and the long segments
   (hallucination-prone): WER, insertions per utterance, hallucination rate, keyword recall.
   Written to results.md / results.json with a plot (results.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from speechrl.services import stack
from speechrl.services.config import add_arguments, from_namespace, option
from speechrl.services.ports import free_port
from speechrl.trainer.asr_job import AsrJobConfig, Services, evaluate
from speechrl.trainer.asr_policy import PromptLayout
from speechrl.trainer.data import MANIFEST, DataConfig, build_asr_dataset, read_manifest
from speechrl.trainer.runner import run_job
from speechrl.trainer.warmstart import WarmStartConfig, run_warmstart

VARIANTS: dict[str, dict[str, float]] = {
    "R1": {"accuracy": 1.0, "hallucination": 0.0, "keyword": 0.0},
    "R1+R2": {"accuracy": 1.0, "hallucination": 1.0, "keyword": 0.0},
    "R1+R2+R3": {"accuracy": 1.0, "hallucination": 1.0, "keyword": 1.0},
}
STACK = ("rules", "encoder", "rollout")


@dataclass
class ReproConfig:
    """Sizes of the reproduction; the defaults fit ~15 minutes on 2 CPU cores."""

    out: str = option("runs/asr-repro", "Run folder: data/, policy/, one folder per variant, results.*")
    variants: str = option("R1,R1+R2,R1+R2+R3", f"Comma-separated reward sets, of {', '.join(VARIANTS)}.")
    train: int = option(1200, "Training utterances.")
    joined: int = option(300, "Training segments of 2-4 joined utterances (6-14 s), so the warm start reads on "
                              "past a sentence end; on longer inputs it then tends to repeat (what R2 targets).")
    test: int = option(150, "Test utterances (the reported WER).")
    long_test: int = option(24, "Long test segments (15-28 s) for the hallucination columns.")
    long_train: int = option(60, "Long training segments (15-28 s) among the RL prompts, where loops happen.")
    warmstart_epochs: int = option(3, "Epochs of the supervised warm start: stopped early on purpose, so RL has room.")
    hidden_size: int = option(256, "LM hidden size.")
    num_layers: int = option(4, "LM layers.")
    steps: int = option(24, "GRPO steps per variant.")
    group_size: int = option(8, "GRPO group size G (the paper: 12).")
    batch_size: int = option(8, "Prompts per GRPO step (the paper: 32).")
    learning_rate: float = option(5e-5, "GRPO learning rate (the paper: 1e-5 for a much larger model).")
    temperature: float = option(0.8, "Rollout sampling temperature: below 1 keeps a small warm-started model's "
                                     "samples near its greedy output, so groups differ by a few words.")
    kl_beta: float = option(0.1, "KL coefficient (the paper: 0.1).")
    seed: int = option(0, "Seed of data, warm start and rollouts.")


def prepare(config: ReproConfig) -> tuple[Path, Path]:
    """The corpus and the warm-start checkpoint, built once and reused by later runs."""
    out = Path(config.out)
    manifest = out / "data" / MANIFEST
    if not manifest.exists():
        print(f"[1/4] speaking the corpus into {manifest.parent}", flush=True)
        build_asr_dataset(DataConfig(out=str(manifest.parent), seed=config.seed, train=config.train, dev=40,
                                     joined=config.joined, test=config.test, long_test=config.long_test,
                                     long_train=config.long_train))
    policy = out / "policy"
    if not (policy / "asr_layout.json").exists():
        print(f"[2/4] warm start ({config.warmstart_epochs} epochs) into {policy}", flush=True)
        run_warmstart(WarmStartConfig(data=str(manifest.parent), out=str(policy), hidden_size=config.hidden_size,
                                      num_layers=config.num_layers, epochs=config.warmstart_epochs, seed=config.seed,
                                      eval_splits="dev"))
    return manifest, policy


def stack_environment(policy: Path, home: Path) -> dict[str, str]:
    """The stack's settings for this policy: its front-end in the encoder, its LM in the rollout service."""
    layout = PromptLayout.load(policy)
    env = {"SPEECHRL_HOME": str(home),
           "SPEECHRL_ENCODER_BACKEND": layout.frontend_backend,
           "SPEECHRL_ENCODER_MODEL_PATH": str((policy / layout.frontend_path).resolve()),
           "SPEECHRL_ROLLOUT_MODEL_PATH": str(policy.resolve())}
    for name in STACK:  # private ports: never collide with a stack the user already runs
        env[f"SPEECHRL_{name.upper()}_PORT"] = str(free_port())
    return env


def job_config(config: ReproConfig, manifest: Path, policy: Path, out_dir: Path, weights: dict[str, float]) -> AsrJobConfig:
    ports = {name: os.environ[f"SPEECHRL_{name.upper()}_PORT"] for name in STACK}
    return AsrJobConfig(
        policy=str(policy), data=str(manifest), out_dir=str(out_dir), steps=config.steps, eval_split="dev",
        train_split="train,long_train",
        eval_size=40, eval_every=max(1, config.steps // 4), checkpoint_every=config.steps, seed=config.seed,
        encoder=f"127.0.0.1:{ports['encoder']}", rollout=f"127.0.0.1:{ports['rollout']}",
        rules=f"127.0.0.1:{ports['rules']}",
        grpo={"group_size": config.group_size, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
              "kl_beta": config.kl_beta, "temperature": config.temperature, "mini_batch_size": config.group_size * 2, "reward_weights": dict(weights),
              "seed": config.seed})


async def evaluate_splits(job: AsrJobConfig, policy: Path) -> dict[str, float]:
    """Greedy WER / insertions / hallucination rate on test and long, with the rollout service's weights."""
    layout = PromptLayout.load(policy)
    rows = read_manifest(job.data)
    results: dict[str, float] = {}
    async with Services.connect(job) as services:
        for split in ("test", "long"):
            part = [r for r in rows if r.split == split]
            if part:
                scores = await evaluate(services, part, layout.max_new_tokens, layout.instruction_ids)
                results.update({key.replace("eval/", f"{split}/"): value for key, value in scores.items()})
    return results


class QuietProgress:
    """One line per step."""

    def __init__(self, label: str):
        self.label = label

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        print(f"  {self.label} step {step}/{total}: reward {metrics['reward_mean']:.3f} wer {metrics['wer']:.3f} "
              f"ins {metrics['insertions']:.2f} kl {metrics.get('kl', 0.0):.4f}", flush=True)

    def cancelled(self) -> bool:
        return False


def run(config: ReproConfig) -> dict[str, Any]:
    out = Path(config.out)
    started = time.monotonic()
    manifest, policy = prepare(config)
    os.environ.update(stack_environment(policy, out / "stack"))
    paths = stack.StackPaths(Path(os.environ["SPEECHRL_HOME"]).resolve())
    print("[3/4] starting the services", flush=True)
    stack.up(STACK, paths, timeout=300)
    table: dict[str, dict[str, float]] = {}
    try:
        baseline_job = job_config(config, manifest, policy, out / "baseline", VARIANTS["R1"])
        table["warm start (baseline)"] = asyncio.run(evaluate_splits(baseline_job, policy))
        print(f"[4/4] GRPO runs: {config.variants}", flush=True)
        for name in config.variants.split(","):
            job = job_config(config, manifest, policy, out / name.replace("+", "_"), VARIANTS[name])
            run_job("asr-grpo", job, QuietProgress(name))
            table[name] = asyncio.run(evaluate_splits(job, policy))
    finally:
        stack.down(STACK, paths, grace=10)
    minutes = round((time.monotonic() - started) / 60, 1)
    results = {"config": asdict(config), "minutes": minutes, "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(table, minutes))
    plot_table(table, out / "results.png")
    print(markdown_table(table, minutes))
    return results


COLUMNS = (("test/wer", "test WER"), ("test/insertions", "test insertions/utt"),
           ("long/wer", "long WER"), ("long/insertions", "long insertions/utt"),
           ("long/hallucination_rate", "long hallucination rate"))


def markdown_table(table: dict[str, dict[str, float]], minutes: float) -> str:
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, scores in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores.get(key, float('nan')):.3f}" for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + f"\n\nWhole run: {minutes} min.\n"


def plot_table(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, (COLUMNS[0], COLUMNS[2], COLUMNS[3]), strict=True):
        ax.bar(range(len(names)), [table[n].get(key, 0.0) for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speechrl.trainer.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, ReproConfig)
    run(from_namespace(ReproConfig, "repro", parser.parse_args(argv)))


if __name__ == "__main__":
    main()

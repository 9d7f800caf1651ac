"""The ASR paper's reward ablation at small scale, on this CPU, through the real services.

    python -m speechrl.trainer.recipes.reproduce --out runs/asr-repro          # the table, seeds 0,1,2 (< 20 min)
    speechrl demo                                                       # the short version (main job)
    python -m speechrl.trainer.recipes.reproduce --out runs/x --prepared runs/asr-repro --variants R1 --steps 60
                                   # a GRPO experiment on an earlier run's corpus and warm start

1. An English corpus spoken by espeak-ng (asr_data.py): train/dev/test plus long test segments. The
   warm start's training utterances are cut tight; dev, test and the RL pool also come as recorded,
   with up to edge_silence_seconds of silence before and after (data.add_recorded_splits), where a
   model trained on tight audio invents words: the hallucination the paper's rewards target.
2. A supervised warm start of a small LLM-ASR (warmstart.py): tiny.en's encoder + a small Qwen2,
   stopped early so RL has room.
3. The local stack (rules, encoder with the policy's front-end, rollout with the policy).
4. Greedy evaluation of the warm start on test (as recorded and tight) and the long segments.
5. RL prompts: the warm start samples G transcripts of candidate utterances of the RL pool (never
   trained on, recorded) and long training segments; the prompts whose samples' rewards differ
   most are kept (data.select_informative_groups): a prompt the warm start always gets right, or
   always wrong the same way, gives GRPO no gradient.
   Options (off by default): a quota of long prompts (--long-pool), long segments held out (--long-dev).
6. One GRPO run per reward set on those prompts, each from the same warm start: R1 (1 - WER), R1+R2
   (+ hallucination penalty), R1+R2+R3 (+ keyword precision/recall); then its greedy evaluation:
   WER and insertions per utterance on test as recorded and cut tight, and on the long segments with
   their hallucination rate. Written with the wall time of every stage to results.md / results.json,
   and a plot (results.png). The test columns use the GRPO step with the lowest dev WER (dev as
   recorded; with --long-dev also the held-out long segments, which sees R2's loops).

The frozen front-end's embeddings are computed once per utterance by the encoder service and
shared by every stage (jobs/asr.py's EmbeddingCache): prompts are drawn many times and the test split is
evaluated once per model, while the front-end never changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from speechrl.services import stack
from speechrl.services.config import option, parse_config
from speechrl.services.ports import free_port
from speechrl.trainer.core.advantages import weighted_rewards
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.jobs import asr
from speechrl.trainer.jobs.asr import REWARD_COMPONENTS, AsrJobConfig, EmbeddingCache, Services, WerMapping, evaluate
from speechrl.trainer.jobs.datasets import MANIFEST, Row, read_manifest, write_manifest
from speechrl.trainer.jobs.progress import LineProgress
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.jobs.selection import select_informative_groups
from speechrl.trainer.jobs.weights import sync_dir
from speechrl.trainer.models.asr_policy import PromptLayout
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from speechrl.trainer.recipes.reporting import mean_spread, over_seeds, parse_seeds, stage_timer, write_results
from speechrl.trainer.recipes.warmstart import WarmStartConfig, run_warmstart

VARIANTS: dict[str, dict[str, float]] = {
    "R1": {"accuracy": 1.0, "hallucination": 0.0, "keyword": 0.0},
    "R1+R2": {"accuracy": 1.0, "hallucination": 1.0, "keyword": 0.0},
    "R1+R2+R3": {"accuracy": 1.0, "hallucination": 1.0, "keyword": 1.0},
}
STACK = ("rules", "encoder", "rollout")
BASELINE = "warm start (baseline)"  # the table's row of the warm start
STAGES_FILE = "stages.json"  # wall seconds of the stages a run folder built (corpus, warm start)
PROMPT_SPLITS = {"train": "rl", "rl_pool": "rl", "long_train": "rl_long"}  # the selected RL prompts, in the run's prompts manifest


@dataclass
class ReproConfig:
    """Sizes of the reproduction; the defaults fit 20 minutes on 2 CPU cores."""

    out: str = option("runs/asr-repro", "Run folder: data/, policy/, one folder per variant, results.*")
    prepared: str = option("", "An earlier run folder whose data/ and policy/ this run reuses (GRPO experiments "
                               "on one warm start); empty: out's own, built when missing.")
    variants: str = option("R1,R1+R2,R1+R2+R3", f"Comma-separated reward sets, of {', '.join(VARIANTS)}.")
    train: int = option(1200, "Training utterances.")
    joined: int = option(150, "Training segments of 2-4 joined utterances (6-14 s), so the warm start reads on "
                              "past a sentence end; on longer inputs it then tends to repeat (what R2 targets).")
    dev: int = option(40, "Dev utterances, all evaluated every eval_every GRPO steps to pick the reported step "
                          "(greedy, ~1 s per 40; as recorded when edge_silence_seconds > 0).")
    test: int = option(150, "Test utterances (the reported WER).")
    long_test: int = option(24, "Long test segments (15-28 s) for the hallucination columns.")
    rl_pool: int = option(160, "Utterances kept for RL prompts (data split rl_pool, recorded like test_recorded), "
                               "never in the warm start's training; the prompt candidates are drawn from them.")
    edge_silence_seconds: float = option(2.0, "dev, test and rl_pool as recorded: 0.2..this many seconds of silence "
                                              "before and after each utterance (data.add_recorded_splits); the warm "
                                              "start, trained on tight audio, invents words there. 0: all tight.")
    long_train: int = option(30, "Long training segments (15-28 s), candidates for the RL prompts (loops happen there).")
    warmstart_epochs: int = option(2, "Epochs of the supervised warm start: short on purpose (the time budget), RL has "
                                      "room.")
    hidden_size: int = option(256, "LM hidden size.")
    num_layers: int = option(4, "LM layers.")
    steps: int = option(16, "GRPO steps per run (16 so that three seeds of three variants fit the 20-minute budget; "
                            "the best dev step of a 30-step run was 25-30).")
    group_size: int = option(8, "GRPO group size G (the paper: 12).")
    batch_size: int = option(8, "Prompts per GRPO step (the paper: 32).")
    learning_rate: float = option(5e-5, "GRPO learning rate (the paper: 1e-5 for a much larger model).")
    warmup_steps: int = option(0, "Optimizer steps of linear learning-rate warm-up at the start of each GRPO run.")
    temperature: float = option(1.0, "Rollout sampling temperature (1: the policy's own distribution, so samples "
                                     "find the words greedy decoding misses).")
    kl_beta: float = option(0.05, "KL coefficient (the paper: 0.1).")
    eval_every: int = option(5, "Dev WER every this many GRPO steps; the test columns use the step with the lowest "
                                "(early stopping on dev: RL on a small model drifts back late in a run).")
    updates_per_step: int = option(4, "AdamW steps per GRPO step: the rollout batch is split into this many "
                                      "mini-batches of whole groups, each its own optimizer step (PPO-style; the ratio "
                                      "clip holds the later ones near the sampling policy). 1: one step per batch.")
    prompt_candidates: int = option(128, "Training utterances the warm start samples G times to choose the RL "
                                         "prompts from (0: no selection, every train and long_train row is a prompt).")
    tight_candidates: int = option(0, "Tight-cut training utterances among the candidates besides the recorded RL pool "
                                      "(the prompt mix): prompts that are all recorded teach the policy what to do "
                                      "with silence, and tight ones keep it from unlearning tight audio meanwhile.")
    long_candidates: int = option(16, "long_train segments among the candidates (where the warm start invents words "
                                      "in pauses and loops: what R2 penalises).")
    prompt_pool: int = option(64, "RL prompts kept: the candidates whose samples' rewards spread the widest.")
    long_pool: int = option(6, "Long segments among the prompt_pool kept (the widest-spread long candidates, the "
                                "rest short ones): enough for GRPO to meet the insertions and loops R2 penalises, "
                                "few enough for the time budget (a step of long prompts costs ~7 short ones); "
                                "0: no quota, widest overall (11 of 64 in a measured run).")
    long_dev: int = option(0, "long_train segments held out of the candidates and evaluated with dev (split "
                              "dev_long) for the best-dev step, so a long-segment gain counts there too; 0: dev only.")
    seed: int = option(0, "Seed of the corpus, the warm start and the prompt selection.")
    seeds: str = option("0,1,2", "Seeds of the GRPO runs (rollout sampling, prompt order), comma-separated: each variant "
                             "runs once per seed from the same warm start and prompts, and the table gives every "
                             "seed's row and their mean and spread (the noise band a difference has to clear).")
    accuracy_mapping: WerMapping = option("one_minus_wer", "How WER becomes R1 (AsrJobConfig.accuracy_mapping).")
    accuracy_floor: float = option(0.0, "Lowest R1 (AsrJobConfig.accuracy_floor): 0 is the paper's clip; -1 lets R1 "
                                        "rank a long loop below a plain miss.")


def prepare(config: ReproConfig, stages: dict[str, Any]) -> tuple[Path, Path]:
    """The corpus and the warm-start checkpoint: the prepared run's, or out's own, built once and reused."""
    home = Path(config.prepared or config.out)
    manifest, policy = home / "data" / MANIFEST, home / "policy"
    built = json.loads((home / STAGES_FILE).read_text()) if (home / STAGES_FILE).exists() else {}
    if config.prepared and not (manifest.exists() and (policy / "asr_layout.json").exists()):
        raise FileNotFoundError(f"--prepared {home}: needs data/{MANIFEST} and policy/ from an earlier run")
    if not manifest.exists():
        print(f"[1/6] speaking the corpus into {manifest.parent}", flush=True)
        with stage_timer(stages, "corpus"):
            build_asr_dataset(DataConfig(out=str(manifest.parent), seed=config.seed, train=config.train, dev=config.dev,
                                         joined=config.joined, test=config.test, long_test=config.long_test,
                                         rl_pool=config.rl_pool, edge_silence_seconds=config.edge_silence_seconds,
                                         long_train=config.long_train))
    if not (policy / "asr_layout.json").exists():
        print(f"[2/6] warm start ({config.warmstart_epochs} epochs) into {policy}", flush=True)
        with stage_timer(stages, "warm start"):
            run_warmstart(WarmStartConfig(data=str(manifest.parent), out=str(policy), hidden_size=config.hidden_size,
                                          num_layers=config.num_layers, epochs=config.warmstart_epochs,
                                          seed=config.seed, eval_splits="dev"))
    built.update({name: stages[name] for name in ("corpus", "warm start") if name in stages})
    (home / STAGES_FILE).write_text(json.dumps(built, indent=2) + "\n")
    for name in ("corpus", "warm start"):  # this run's time, or where the stage was built before
        if name not in stages:
            minutes = f", {duration(built[name])}" if name in built else ""
            stages[name] = f"reused ({home}{minutes})"
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


def job_config(config: ReproConfig, manifest: Path, policy: Path, out_dir: Path, weights: dict[str, float],
               train_split: str = "train,long_train", eval_split: str = "dev") -> AsrJobConfig:
    ports = {name: os.environ[f"SPEECHRL_{name.upper()}_PORT"] for name in STACK}
    return AsrJobConfig(
        policy=str(policy), data=str(manifest), out_dir=str(out_dir), steps=config.steps, eval_split=eval_split,
        train_split=train_split, batch_by_split=True,  # long segments in steps of their own: short steps stay cheap
        eval_size=config.dev + (config.long_dev if "dev_long" in eval_split else 0), eval_every=config.eval_every,
        checkpoint_every=config.steps, seed=config.seed, accuracy_mapping=config.accuracy_mapping,
        accuracy_floor=config.accuracy_floor,
        encoder=f"127.0.0.1:{ports['encoder']}", rollout=f"127.0.0.1:{ports['rollout']}",
        rules=f"127.0.0.1:{ports['rules']}",
        grpo=GRPOConfig(group_size=config.group_size, batch_size=config.batch_size, learning_rate=config.learning_rate,
                        warmup_steps=config.warmup_steps, kl_beta=config.kl_beta, temperature=config.temperature,
                        reward_weights=dict(weights),
                        # micro-batches of 2 groups, summed into updates_per_step optimizer steps
                        mini_batch_size=config.group_size * 2,
                        gradient_accumulation_steps=max(1, config.batch_size // 2 // config.updates_per_step),
                        seed=config.seed))


async def evaluate_splits(job: AsrJobConfig, policy: Path, manifest: Path,
                          cache: EmbeddingCache | None = None) -> dict[str, float]:
    """Greedy WER / insertions / hallucination rate on test and long, with the rollout service's weights."""
    layout = PromptLayout.load(policy)
    rows = read_manifest(manifest)
    results: dict[str, float] = {}
    async with Services.connect(job) as services:
        for split in ("test_recorded", "test", "long"):
            part = [r for r in rows if r.split == split]
            if part:
                scores = await evaluate(services, part, layout, cache)
                results.update({key.replace("eval/", f"{split}/"): value for key, value in scores.items()})
    return results


async def sample_rewards(job: AsrJobConfig, policy: Path, rows: list[Row], cache: EmbeddingCache,
                         batch_size: int = 32) -> list[list[float | None]]:
    """G sampled transcripts of each row from the rollout service's current weights, and their rewards
    (the job's reward weights and temperature), one group per row."""
    grpo = job.grpo
    layout = PromptLayout.load(policy)
    groups: list[list[float | None]] = []
    async with Services.connect(job) as services:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            audio = await asr.encode(services, batch, cache)  # P x [T_i, D]
            results = await services.rollout.generate(
                [a.numpy() for a in audio], n=grpo.group_size, temperature=grpo.temperature,
                max_tokens=max(layout.max_new_tokens(a.shape[0]) for a in audio), seed=job.seed * 7919 + start,
                **layout.token_ids_around_audio())
            texts = [s.text for r in results for s in r.unwrap()]  # P * G, group order
            components = await asr.score(services, texts, [row for row in batch for _ in range(grpo.group_size)], job)
            rewards = weighted_rewards({k: components[k] for k in REWARD_COMPONENTS}, grpo.reward_weights)
            groups += [rewards[i:i + grpo.group_size] for i in range(0, len(rewards), grpo.group_size)]
    return groups


def dev_split(rows: Sequence[Row]) -> str:
    """The split that picks the reported step: dev as recorded where the corpus has it, like the test column."""
    return "dev_recorded" if any(r.split == "dev_recorded" for r in rows) else "dev"


def keep_prompts(candidates: Sequence[Row], groups: Sequence[Sequence[float | None]], pool: int,
                 long_pool: int = 0) -> list[Row]:
    """The pool candidates whose sampled rewards spread the widest (data.select_informative_groups);
    with long_pool, up to long_pool of them long_train segments (the widest-spread long ones) and the
    rest short, so the long prompts are not crowded out by the many short ones."""
    if not long_pool:
        return select_informative_groups(candidates, groups, count=pool)
    kept: list[Row] = []
    for is_long, count in ((True, min(long_pool, pool)), (False, None)):
        part = [i for i, row in enumerate(candidates) if (row.split == "long_train") == is_long]
        kept += select_informative_groups([candidates[i] for i in part], [groups[i] for i in part],
                                          count=pool - len(kept) if count is None else count)
    return kept


def select_prompts(config: ReproConfig, job: AsrJobConfig, policy: Path, manifest: Path,
                   cache: EmbeddingCache) -> tuple[Path, dict[str, int]]:
    """The RL prompts (module docstring, step 5) in a manifest of their own beside the dev split and the
    held-out long segments (dev_long); returns it and the counts (candidates, with any reward spread,
    kept, long ones kept)."""
    rows = read_manifest(manifest)
    rng = random.Random(config.seed)
    short = [r for r in rows if r.split == "rl_pool"] or [r for r in rows if r.split == "train"]
    long = [r for r in rows if r.split == "long_train"]
    long_dev: list[Row] = []
    if config.long_dev:  # held out first: never a prompt
        rng.shuffle(long)
        long_dev, long = long[:config.long_dev], long[config.long_dev:]
    candidates = rng.sample(short, min(config.prompt_candidates, len(short)))
    if config.tight_candidates and any(r.split == "rl_pool" for r in short):
        tight = [r for r in rows if r.split == "train"]
        candidates += rng.sample(tight, min(config.tight_candidates, len(tight)))
    candidates += (long[:config.long_candidates] if long_dev
                   else rng.sample(long, min(config.long_candidates, len(long))))
    groups = asyncio.run(sample_rewards(job, policy, candidates, cache))
    informative = select_informative_groups(candidates, groups)
    kept = keep_prompts(candidates, groups, config.prompt_pool, config.long_pool)
    dev = dev_split(rows)
    path = Path(config.out) / "prompts.jsonl"
    write_manifest(path, [replace(r, split=PROMPT_SPLITS[r.split]) for r in kept]
                   + [r for r in rows if r.split == dev] + [replace(r, split="dev_long") for r in long_dev])
    counts = {"candidates": len(candidates), "informative": len(informative), "kept": len(kept),
              "long kept": sum(r.split == "long_train" for r in kept), "long dev": len(long_dev)}
    return path, counts


PROGRESS_KEYS = ("reward_mean", "wer", "insertions", "kl", "eval/wer")  # one line per RL step
BEST_WEIGHTS = "best-dev.safetensors"
BEST_RECORD = "best-dev.json"  # {"dev_wer", "step"} of BEST_WEIGHTS


class BestDevProgress(LineProgress):
    """One line per step, and the weights of the step with the lowest dev WER so far copied to
    <out_dir>/best-dev.safetensors (from the file the job has just pushed to the rollout service),
    with their dev WER and step beside them: a rerun over a finished job runs no step, and still
    serves and reports the step the first run chose."""

    def __init__(self, label: str, job: AsrJobConfig):
        super().__init__(label, PROGRESS_KEYS)
        self.job = job
        self.best: tuple[float, int] | None = None  # (dev WER, step)
        record, weights = Path(job.out_dir) / BEST_RECORD, Path(job.out_dir) / BEST_WEIGHTS
        if record.exists() and weights.exists():
            kept = json.loads(record.read_text())
            self.best = (kept["dev_wer"], kept["step"])

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        super().report(step, total, metrics)
        dev = metrics.get("eval/wer")
        if dev is not None and (self.best is None or dev < self.best[0]):
            pushed = sync_dir(self.job) / f"policy-v{metrics['policy_version']:06d}.safetensors"
            if pushed.exists():
                shutil.copyfile(pushed, Path(self.job.out_dir) / BEST_WEIGHTS)
                (Path(self.job.out_dir) / BEST_RECORD).write_text(json.dumps({"dev_wer": dev, "step": step}))
                self.best = (dev, step)


async def serve_best(job: AsrJobConfig, progress: BestDevProgress) -> int:
    """Early stopping on dev: the rollout service gets the best-dev weights when they are not the last
    step's; returns the step whose weights it now serves."""
    path = Path(job.out_dir) / BEST_WEIGHTS
    if progress.best is None or progress.best[1] == job.steps or not path.exists():
        return job.steps
    async with Services.connect(job) as services:
        version = (await services.rollout.get_service_status()).policy_version + 1
        if await services.rollout.update_weights(version, str(path.resolve()), format="full") != version:
            raise RuntimeError("the rollout service did not take the best-dev weights")
    return progress.best[1]


def run(config: ReproConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stages: dict[str, Any] = {}
    manifest, policy = prepare(config, stages)
    os.environ.update(stack_environment(policy, out / "stack"))
    paths = stack.StackPaths(Path(os.environ["SPEECHRL_HOME"]).resolve())
    print("[3/6] starting the services", flush=True)
    table: dict[str, dict[str, float]] = {}
    cache = EmbeddingCache(max_items=100_000)  # every utterance of the run: the front-end is frozen
    selection: dict[str, int] = {}
    with contextlib.ExitStack() as services:
        with stage_timer(stages, "services up"):
            services.enter_context(stack.running(STACK, paths, timeout=300))
        baseline_job = job_config(config, manifest, policy, out / "baseline", VARIANTS["R1+R2"])
        print("[4/6] evaluating the warm start", flush=True)
        with stage_timer(stages, "eval warm start"):
            table[BASELINE] = asyncio.run(evaluate_splits(baseline_job, policy, manifest, cache))
        prompts, train_split, eval_split = manifest, "train,long_train", "dev"
        if config.prompt_candidates:
            print(f"[5/6] choosing {config.prompt_pool} RL prompts among {config.prompt_candidates} + "
                  f"{config.long_candidates} long candidates", flush=True)
            with stage_timer(stages, "prompt selection"):
                prompts, selection = select_prompts(config, baseline_job, policy, manifest, cache)
            train_split = ",".join(PROMPT_SPLITS.values())
            eval_split = dev_split(read_manifest(manifest)) + (",dev_long" if config.long_dev else "")
            print(f"  {selection}", flush=True)
        seeds = parse_seeds(config.seeds)
        print(f"[6/6] GRPO runs: {config.variants}" + (f", seeds {config.seeds}" if len(seeds) > 1 else ""),
              flush=True)
        for name in config.variants.split(","):
            for seed in seeds:
                label = run_label(name, seed, seeds)
                job = job_config(replace(config, seed=seed), prompts, policy, out / label_folder(label),
                                 VARIANTS[name], train_split, eval_split)
                progress = BestDevProgress(label, job)
                with stage_timer(stages, f"GRPO {label}"):
                    run_job(asr.AsrGrpo(cache), job, progress)
                with stage_timer(stages, f"eval {label}"):
                    served = asyncio.run(serve_best(job, progress))
                    table[label] = {**asyncio.run(evaluate_splits(job, policy, manifest, cache)), "step": served}
                print(f"  {label}: test and long evaluated at step {served} (lowest dev WER)", flush=True)
    minutes = round((time.monotonic() - started) / 60, 1)
    summary = seed_summaries(table, config.variants.split(","), seeds)
    results = {"config": asdict(config), "minutes": minutes, "stages_seconds": stages, "prompt_selection": selection,
               "table": table, "over_seeds": {name: {k: list(v) for k, v in s.items()} for name, s in summary.items()}}
    write_results(out, results, markdown_table(table, minutes, stages, summary))
    plot_table(table, out / "results.png", summary)
    return results


def run_label(variant: str, seed: int, seeds: Sequence[int]) -> str:
    """A run's row in the table: the variant, and its seed when there are several."""
    return variant if len(seeds) == 1 else f"{variant}, seed {seed}"


def label_folder(label: str) -> str:
    """A run's folder under out: "R1+R2, seed 1" -> "R1_R2-seed1"."""
    return label.replace("+", "_").replace(", seed ", "-seed")


def seed_summaries(table: dict[str, dict[str, float]], variants: Sequence[str],
                   seeds: Sequence[int]) -> dict[str, dict[str, tuple[float, float]]]:
    """Each variant's metrics over its seeds (mean, spread); empty with one seed."""
    if len(seeds) == 1:
        return {}
    return {name: over_seeds([table[run_label(name, seed, seeds)] for seed in seeds]) for name in variants}


COLUMNS = (("test_recorded/wer", "test WER, recorded"), ("test_recorded/insertions", "test insertions/utt, recorded"),
           ("test/wer", "test WER, tight"), ("test/insertions", "test insertions/utt, tight"),
           ("long/wer", "long WER"), ("long/insertions", "long insertions/utt"),
           ("long/hallucination_rate", "long hallucination rate"))


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def markdown_table(table: dict[str, dict[str, float]], minutes: float, stages: dict[str, Any] | None = None,
                   summary: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    header = "| model | " + " | ".join(label for _, label in COLUMNS) + " | GRPO step (lowest dev WER) |"
    rule = "|---|" + "---|" * (len(COLUMNS) + 1)
    lines = [header, rule]
    for name, scores in table.items():
        step = f"{scores['step']:.0f}" if "step" in scores else "-"
        lines.append(f"| {name} | " + " | ".join(f"{scores.get(key, float('nan')):.3f}" for key, _ in COLUMNS)
                     + f" | {step} |")
    if summary:
        lines += ["", "Over the seeds: mean ± spread (sample standard deviation).", "", header, rule]
        for name, stats in summary.items():
            lines.append(f"| {name} | " + " | ".join(mean_spread(stats[key]) if key in stats else "-" for key, _ in COLUMNS)
                         + f" | {mean_spread(stats['step'], 0) if 'step' in stats else '-'} |")
    text = "\n".join(lines) + "\n"
    if stages:
        text += "\n| stage | wall time |\n|---|---|\n" + "".join(
            f"| {name} | {duration(value) if isinstance(value, (int, float)) else value} |\n"
            for name, value in stages.items())
    return text + f"\nWhole run: {minutes} min.\n"


def plot_table(table: dict[str, dict[str, float]], path: Path,
               summary: dict[str, dict[str, tuple[float, float]]] | None = None) -> None:
    """Bars of test WER (recorded, tight) and long-segment insertions per model; with seeds, one bar
    per variant at its mean with the spread as an error bar, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, float]]] = {}
    for name, scores in table.items():  # "R1+R2, seed 1" joins its variant's bar
        groups.setdefault(name.split(", seed ")[0] if summary else name, []).append(scores)
    names = list(groups)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    plotted = [column for column in COLUMNS if column[0] in ("test_recorded/wer", "test/wer", "long/insertions")]
    for ax, (key, label) in zip(axes, plotted, strict=True):
        means = [float(np.mean([s.get(key, 0.0) for s in groups[n]])) for n in names]
        spreads = [summary[n][key][1] if summary and n in summary and key in summary[n] else 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=spreads, capsize=4, color="tab:blue")
        for i, n in enumerate(names):
            if len(groups[n]) > 1:
                ax.plot([i] * len(groups[n]), [s.get(key, 0.0) for s in groups[n]], "o", color="black", ms=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(label + (" (mean ± spread over seeds)" if summary else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_config(ReproConfig, "repro", argv, description=__doc__, prog="python -m speechrl.trainer.recipes.reproduce"))


if __name__ == "__main__":
    main()

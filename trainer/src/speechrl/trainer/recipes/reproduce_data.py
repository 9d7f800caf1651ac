"""The ASR paper's data-construction ablation at small scale, on this CPU, through the real services.

    python -m speechrl.trainer.recipes.reproduce_data --out runs/asr-data-repro     # the table, seeds 0,1,2 (~18 min)
    python -m speechrl.trainer.recipes.reproduce_data --out runs/x --prepared runs/asr-data-repro --seeds 3,4
                                   # more seeds on an earlier run's corpus and warm start

Every data set is a prompt_selection of the GRPO job (jobs/selection.py) over the same candidate
rows (POOL: the recorded RL pool, the long training segments and the long repeats), the same number
of prompts each (--prompt-count), the same steps, from the same warm start:

    D0 random    prompt_count rows at random
    D1 hard      the rows where the warm start's greedy transcript and Whisper tiny.en's (the
                 intelligibility service) disagree most, and the long segments that say a sentence twice
    D2 short     prompt_count rows at random among those under 20 s
    D3 keyword   prompt_count rows at random among the keyword-rich (>= 2 keywords); R3 joins R1 + R2

1-2. Corpus and warm start: reproduce.prepare, as the reward ablation builds them (or --prepared's).
3. Long repeats: long_repeat long training segments that say one of their sentences twice in a row
   (asr_data.build_long_repeats), unless the corpus has them; the corpus and they make pool.jsonl.
4. The local stack on private ports: rules, encoder, rollout (as reproduce.py) and intelligibility.
5. The warm start, evaluated greedily.
6. Per data set and seed, a GRPO run (R1+R2; D3 R1+R2+R3), then the rollout service gets its weights
   of the lowest dev WER (dev as recorded) and the run is evaluated greedily: WER and insertions per
   utterance on test as recorded and cut tight, insertions per long test segment, and keyword recall
   and precision on the recorded test's keyword-rich rows. results.md / results.json / results.png:
   per data set the mean and spread (sample standard deviation) over the seeds, each seed's row, the
   prompts each selection kept, and the wall time of every stage.

The defaults (seeds 0, 1, 2; 16 steps) fit 20 minutes on 2 cores: 17.7 min measured from nothing on
a quiet machine (bench/RESULTS.md); D1's hard cases are chosen once and reused across seeds. With --prepared the candidates are that corpus's (its rl_pool and
long_train, as sized when it was built). Flags of the reward ablation that choose its prompts
(--variants, --prompt-candidates, --tight-candidates, --long-candidates, --prompt-pool, --long-pool,
--long-dev) do nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from speechrl.services import stack
from speechrl.services.config import option, parse_config
from speechrl.services.ports import free_port
from speechrl.trainer.jobs import asr
from speechrl.trainer.jobs.asr import PROMPTS_FILE, AsrJobConfig, EmbeddingCache, Services
from speechrl.trainer.jobs.datasets import Row, read_manifest, write_manifest
from speechrl.trainer.jobs.progress import mean_of
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.jobs.selection import PromptSelection, select_keyword_rich
from speechrl.trainer.models.asr_policy import PromptLayout
from speechrl.trainer.recipes.asr_data import DataConfig, build_long_repeats
from speechrl.trainer.recipes.reporting import mean_spread, parse_seeds, stage_timer, write_results
from speechrl.trainer.recipes.reproduce import (
    BASELINE,
    STACK,
    VARIANTS,
    BestDevProgress,
    ReproConfig,
    dev_split,
    duration,
    evaluate_splits,
    job_config,
    prepare,
    run_label,
    seed_summaries,
    serve_best,
    stack_environment,
)

# name -> (the job's prompt_selection, its reward set in reproduce.VARIANTS)
DATA_SETS: dict[str, tuple[PromptSelection, str]] = {
    "D0 random": ("random", "R1+R2"),
    "D1 hard": ("hard", "R1+R2"),
    "D2 < 20 s": ("short", "R1+R2"),
    "D3 keyword-rich": ("keyword", "R1+R2+R3"),
}
POOL = "rl_pool,long_train,long_repeat"  # the candidate rows every data set selects from
LONG_SPLITS = ("long_train", "long_repeat")
STACK_DATA = (*STACK, "intelligibility")


@dataclass
class DataReproConfig(ReproConfig):
    """Sizes of the data-construction ablation (the reward ablation's flags, some defaults changed, and
    its own); the defaults fit 20 minutes on 2 CPU cores."""

    out: str = option("runs/asr-data-repro", "Run folder: data/, policy/, pool.jsonl, one folder per data set and "
                                             "seed, results.*")
    data_sets: str = option("D0,D1,D2,D3", f"Comma-separated data sets, of {', '.join(n.split()[0] for n in DATA_SETS)}.")
    prompt_count: int = option(32, "Prompts of every data set (the job's prompt_count): D3 keeps at most the "
                                   "keyword-rich rows of the pool (about a fifth of rl_pool and most long segments).")
    rl_pool: int = option(160, "Recorded utterances in the candidate pool (data split rl_pool), never in the warm "
                               "start's training.")
    long_train: int = option(6, "Long training segments (15-28 s) in the candidate pool: few, since a step of long "
                                "prompts costs several short ones, and every selection may keep them.")
    long_repeat: int = option(4, "Long training segments that say one of their sentences twice, in the candidate "
                                 "pool (D1 keeps all of them): added to the corpus when it has none.")
    steps: int = option(16, "GRPO steps of every run (16 so that three seeds fit the 20-minute budget).")
    seeds: str = option("0,1,2", "Seeds of the GRPO runs, comma-separated: each data set runs once per seed from the "
                                 "same warm start (D1 with the same hard cases), and the table gives every seed's row "
                                 "and their mean and spread.")
    eval_every: int = option(4, "Dev WER every this many GRPO steps; the test columns use the step with the lowest.")

    def __post_init__(self) -> None:
        unknown = [name for name in self.data_set_names if name not in DATA_SETS]
        if unknown or not self.data_set_names:
            raise ValueError(f"data_sets: unknown {unknown}; choose from D0, D1, D2, D3")
        if self.prompt_count < 1:
            raise ValueError(f"prompt_count must be >= 1, got {self.prompt_count}")
        parse_seeds(self.seeds)

    @property
    def data_set_names(self) -> list[str]:
        """"D0,D3" -> ["D0 random", "D3 keyword-rich"]."""
        keys = [key.strip() for key in self.data_sets.split(",") if key.strip()]
        return [next((name for name in DATA_SETS if name.split()[0] == key), key) for key in keys]


def candidate_pool(config: DataReproConfig, manifest: Path, stages: dict[str, Any]) -> Path:
    """out/pool.jsonl: the corpus's rows, with config.long_repeat long repeats added when it has none."""
    rows = read_manifest(manifest)
    if config.long_repeat and not any(row.split == "long_repeat" for row in rows):
        print(f"[3/6] {config.long_repeat} long segments that say a sentence twice", flush=True)
        with stage_timer(stages, "long repeats"):
            rows += build_long_repeats(rows, Path(config.out) / "repeats",
                                       DataConfig(seed=config.seed, long_repeat=config.long_repeat))
    return write_manifest(Path(config.out) / "pool.jsonl", rows)


def data_job(config: DataReproConfig, name: str, seed: int, pool: Path, policy: Path, eval_split: str) -> AsrJobConfig:
    """The GRPO job of one data set and seed: the reward ablation's job over the pool, with its selection."""
    selection, rewards = DATA_SETS[name]
    job = job_config(replace(config, seed=seed), pool, policy, Path(config.out) / f"{name.split()[0]}-seed{seed}",
                     VARIANTS[rewards], POOL, eval_split)
    return replace(job, prompt_selection=selection, prompt_count=config.prompt_count,
                   intelligibility=f"127.0.0.1:{os.environ['SPEECHRL_INTELLIGIBILITY_PORT']}")


async def keyword_scores(job: AsrJobConfig, policy: Path, manifest: Path, cache: EmbeddingCache) -> dict[str, float]:
    """Keyword recall and precision of the rollout service's greedy transcripts on the keyword-rich rows
    (select_keyword_rich) of the recorded test split."""
    rows = select_keyword_rich(read_manifest(manifest, "test_recorded"))
    if not rows:
        return {}
    async with Services.connect(job) as services:
        texts = await asr.transcribe(services, rows, PromptLayout.load(policy), cache)
        components = await asr.score(services, texts, rows)
    return {"keywords/recall": mean_of(components["keyword_recall"]),
            "keywords/precision": mean_of(components["keyword_precision"]), "keywords/rows": float(len(rows))}


def evaluate(job: AsrJobConfig, policy: Path, manifest: Path, cache: EmbeddingCache) -> dict[str, float]:
    """The table's numbers for the weights the rollout service serves now."""
    return {**asyncio.run(evaluate_splits(job, policy, manifest, cache)),
            **asyncio.run(keyword_scores(job, policy, manifest, cache))}


def prompts_kept(job: AsrJobConfig, pool: Sequence[Row]) -> dict[str, float]:
    """How many prompts the job's selection kept (its out_dir/prompts.json), and how many are long."""
    ids = set(json.loads((Path(job.out_dir) / PROMPTS_FILE).read_text())["ids"])
    kept = [row for row in pool if row.id in ids]
    return {"prompts": float(len(kept)), "prompts/long": float(sum(row.split in LONG_SPLITS for row in kept)),
            "prompts/repeats": float(sum(row.split == "long_repeat" for row in kept))}


def run(config: DataReproConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started, stages = time.monotonic(), dict[str, Any]()
    seeds, names = parse_seeds(config.seeds), config.data_set_names
    manifest, policy = prepare(config, stages)
    pool = candidate_pool(config, manifest, stages)
    os.environ.update(stack_environment(policy, out / "stack"), SPEECHRL_INTELLIGIBILITY_PORT=str(free_port()))
    paths = stack.StackPaths(Path(os.environ["SPEECHRL_HOME"]).resolve())
    print("[4/6] starting the services (rules, encoder, rollout, intelligibility)", flush=True)
    table: dict[str, dict[str, float]] = {}
    cache = EmbeddingCache(max_items=100_000)  # every utterance of the run: the front-end is frozen
    candidates = read_manifest(pool, POOL)
    with contextlib.ExitStack() as services:
        with stage_timer(stages, "services up"):
            services.enter_context(stack.running(STACK_DATA, paths, timeout=300))
        eval_split = dev_split(read_manifest(manifest))
        print("[5/6] evaluating the warm start", flush=True)
        with stage_timer(stages, "eval warm start"):
            baseline = job_config(config, pool, policy, out / "baseline", VARIANTS["R1+R2"], POOL, eval_split)
            table[BASELINE] = evaluate(baseline, policy, manifest, cache)
        print(f"[6/6] GRPO runs on {len(candidates)} candidate prompts: {', '.join(names)}; seeds {config.seeds}",
              flush=True)
        for name in names:
            for seed in seeds:
                label = run_label(name, seed, seeds)
                job = data_job(config, name, seed, pool, policy, eval_split)
                if DATA_SETS[name][0] == "hard" and seed != seeds[0]:  # hard cases do not depend on the seed: the
                    # first seed's, which Whisper took a minute to choose, are taken again (the job reuses them)
                    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(data_job(config, name, seeds[0], pool, policy, eval_split).out_dir)
                                    / PROMPTS_FILE, Path(job.out_dir) / PROMPTS_FILE)
                progress = BestDevProgress(label, job)
                with stage_timer(stages, f"GRPO {label}"):
                    run_job(asr.AsrGrpo(cache), job, progress)
                kept = prompts_kept(job, candidates)
                with stage_timer(stages, f"eval {label}"):
                    served = asyncio.run(serve_best(job, progress))
                    table[label] = {**evaluate(job, policy, manifest, cache), **kept, "step": served}
                print(f"  {label}: {kept['prompts']:.0f} prompts ({kept['prompts/long']:.0f} long, "
                      f"{kept['prompts/repeats']:.0f} repeats); test evaluated at step {served} (lowest dev WER): "
                      f"WER {table[label]['test_recorded/wer']:.3f} recorded", flush=True)
    minutes = round((time.monotonic() - started) / 60, 1)
    summary = seed_summaries(table, names, seeds)
    results = {"config": asdict(config), "minutes": minutes, "stages_seconds": stages, "table": table,
               "over_seeds": {name: {k: list(v) for k, v in s.items()} for name, s in summary.items()}}
    write_results(out, results, markdown_table(table, summary, names, seeds, minutes, stages))
    plot_table(table, summary, names, seeds, out / "results.png")
    return results


COLUMNS = (("test_recorded/wer", "test WER, recorded"), ("test/wer", "test WER, tight"),
           ("test_recorded/insertions", "insertions/utt, recorded"), ("test/insertions", "insertions/utt, tight"),
           ("long/insertions", "long insertions/segment"), ("keywords/recall", "keyword recall"),
           ("keywords/precision", "keyword precision"), ("prompts", "prompts"), ("prompts/long", "of them long"),
           ("step", "GRPO step (lowest dev WER)"))


def cell(value: float | tuple[float, float] | None, key: str) -> str:
    digits = 0 if key in ("step", "prompts", "prompts/long") else 3
    if value is None:
        return "-"
    return mean_spread(value, digits) if isinstance(value, tuple) else f"{value:.{digits}f}"


def markdown_table(table: dict[str, dict[str, float]], summary: dict[str, dict[str, tuple[float, float]]],
                   names: Sequence[str], seeds: Sequence[int], minutes: float, stages: dict[str, Any]) -> str:
    """The table per data set (mean ± spread over the seeds when there are several), each seed's row,
    and the stage times."""
    header = ["| data set | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]

    def row(name: str, values: dict[str, Any]) -> str:
        return f"| {name} | " + " | ".join(cell(values.get(key), key) for key, _ in COLUMNS) + " |"

    rows = {name: summary.get(name) or table[run_label(name, seeds[0], seeds)] for name in names}
    lines = [*header, row(BASELINE, table[BASELINE]),
             *(row(name, values) for name, values in rows.items())]
    rewards = ", ".join(f"{name.split()[0]} {DATA_SETS[name][1]}" for name in names)
    keyword_rows = table[BASELINE].get("keywords/rows", 0)
    lines += ["", f"Rewards: {rewards}. Keyword columns: the {keyword_rows:.0f} keyword-rich rows of the recorded test "
              "split." + (f" Data sets: mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}."
                          if len(seeds) > 1 else "")]
    if len(seeds) > 1:
        lines += ["", *header, *(row(label, values) for label, values in table.items() if "seed" in label)]
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {name} | {duration(value) if isinstance(value, (int, float)) else value} |"
              for name, value in stages.items()]
    return "\n".join(lines) + f"\n\nWhole run: {minutes} min.\n"


def plot_table(table: dict[str, dict[str, float]], summary: dict[str, dict[str, tuple[float, float]]],
               names: Sequence[str], seeds: Sequence[int], path: Path) -> None:
    """Bars of recorded test WER, long-segment insertions and keyword recall per data set, with the
    spread over seeds as error bars; the warm start as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [c for c in COLUMNS if c[0] in ("test_recorded/wer", "long/insertions", "keywords/recall")]
    fig, axes = plt.subplots(1, len(plotted), figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, plotted, strict=True):
        stats = [summary[n].get(key, (0.0, 0.0)) if n in summary else (table[run_label(n, seeds[0], seeds)].get(key, 0.0),
                                                                      0.0) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats] if summary else None,
               color="tab:blue", capsize=4)
        ax.axhline(table[BASELINE].get(key, 0.0), color="k", linestyle="--", label="warm start")
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_config(DataReproConfig, "data_repro", argv, description=__doc__,
                     prog="python -m speechrl.trainer.recipes.reproduce_data"))


if __name__ == "__main__":
    main()

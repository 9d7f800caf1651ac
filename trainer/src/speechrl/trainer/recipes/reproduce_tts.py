"""DiffRO's table (arXiv 2507.05911) at small scale, on this CPU, real audio and real scorers end to end.

    python -m speechrl.trainer.recipes.reproduce_tts --out runs/tts-repro        # < 20 min on 2 cores

1. Corpus + warm start (tts_warmstart.py): asr_data.py's sentences, espeak-ng's phonemes as speech
   tokens, a small Qwen2 TTS policy trained on them with substituted / dropped targets, stopped early.
2. Token2Reward (token2reward.py) trained on the corpus's clean (tokens, text) pairs: DiffRO's reward.
3. The services: rollout (the policy), token2wav (espeak-ng renders the tokens), intelligibility
   (Whisper tiny.en) and speaker (Resemblyzer), as `speechrl up` starts them, on private ports.
4. Runs from the same warm start: GRPO (audio rewards), DiffRO (Token2Reward only: no ASR in the
   loop), GRPO+DiffRO without the sample filter, GRPO+DiffRO with it.
5. Each system, and the warm start (baseline), synthesises the held-out test sentences greedily;
   token2wav renders them, Whisper scores WER and the speaker scorer SIM against the prompt voice.
   espeak's own phonemes of the same sentences, rendered and scored the same way, are the ceiling
   of this pipeline (Whisper tiny.en on espeak audio is far from WER 0). Written to results.md /
   results.json with results.png (bars per system; reward curves).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from speechrl.services import stack
from speechrl.services.config import option, parse_config
from speechrl.services.ports import free_port
from speechrl.services.token2wav import token2reward
from speechrl.trainer.jobs.datasets import read_corpus
from speechrl.trainer.jobs.progress import LineProgress, mean_of
from speechrl.trainer.jobs.registry import parse_job, run_job
from speechrl.trainer.jobs.tts import Prompt, TtsJobConfig, TtsServices, evaluate, render, score, speaker_references
from speechrl.trainer.models.tts_policy import TtsLayout
from speechrl.trainer.recipes.reporting import stage_timer, write_results
from speechrl.trainer.recipes.token2reward import train as train_token2reward
from speechrl.trainer.recipes.tts_warmstart import TtsWarmStartConfig, run_tts_warmstart

STACK = ("intelligibility", "speaker", "rollout", "token2wav")
# system -> (job kind, GRPOConfig overrides); the audio rewards act only where GRPO does.
SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "GRPO": ("tts-grpo", {}),
    "DiffRO": ("tts-diffro", {"reward_weights": {"intelligibility": 0.0, "speaker": 0.0, "duration": 0.2}}),
    "GRPO+DiffRO (no filter)": ("tts-grpo+diffro", {"diffro_filter": False}),
    "GRPO+DiffRO (filter)": ("tts-grpo+diffro", {"diffro_filter": True}),
}


@dataclass
class TtsReproConfig:
    """Sizes of the TTS reproduction; the defaults fit < 20 minutes on 2 CPU cores."""

    out: str = option("runs/tts-repro", "Run folder: warm/ (corpus, policy), token2reward/, one folder per system, "
                                        "results.*")
    systems: str = option(",".join(SYSTEMS), f"Comma-separated systems, of {', '.join(SYSTEMS)}.")
    train: int = option(600, "Training sentences (warm start, Token2Reward, RL prompts).")
    test: int = option(30, "Held-out test sentences (the reported WER / SIM): Whisper costs ~0.35-1 s each.")
    warmstart_steps: int = option(150, "Warm-start updates: stopped early on purpose, so RL has room.")
    token2reward_steps: int = option(300, "Token2Reward training updates.")
    steps: int = option(10, "RL steps per system.")
    group_size: int = option(8, "G: samples per text (the paper's 8: a group mean of 4 noisy WERs is a poor baseline).")
    batch_size: int = option(2, "Texts per step: G * batch_size samples go through Whisper each step.")
    learning_rate: float = option(1e-4, "RL learning rate (AdamW moves every weight ~lr per step whatever the "
                                        "gradient's size: 2e-4 drifted the tiny policy to KL 0.09 in 8 steps).")
    kl_beta: float = option(0.05, "GRPO's KL coefficient.")
    diffro_beta: float = option(0.05, "DiffRO's token-level KL coefficient beta.")
    temperature: float = option(0.3, "Rollout temperature. The warm start's samples at 0.3 have mean WER ~0.71 and "
                                     "spread within every group; at 0.5-0.7 more of them reach WER >= 1, where "
                                     "1 - WER is clipped to 0 and the group has nothing to compare.")
    diffro_lambda: float = option(0.002, "lambda of the DiffRO term in GRPO+DiffRO. Its R is a sum over a sentence's "
                                         "characters (~100-300 nats; gradient norm ~1000-2000 against GRPO's ~2.5), "
                                         "so 0.002 puts the filtered term (about half the samples) at GRPO's scale.")
    voices: str = option("en-us,en-gb+f3,en-us+m7", "espeak voices (speaker prompts), round-robin over texts.")
    threads: int = option(1, "torch threads of this process (warm start, Token2Reward, RL updates); 0 leaves "
                             "torch's default. On a shared 2-core machine 1 thread trained Token2Reward 3.8x faster "
                             "than 2 (0.36 vs 1.35 s per step) while the services ran beside it.")
    eval_temperature: float = option(0.0, "Test synthesis temperature (0: greedy), the same seed for every system.")
    seed: int = option(0, "Seed of everything.")


# One line per RL step; components a run does not compute are NaN and left out.
PROGRESS_KEYS = ("reward_mean", "reward/intelligibility", "wer", "sim", "diffro_reward", "kl", "diffro_kl")


def train_reward_model(config: TtsReproConfig, corpus: Path, out: Path) -> Path:
    """Token2Reward on the clean (tokens, text) pairs of the training split (reused when present)."""
    if (out / token2reward.CHECKPOINT).exists():
        return out
    from speechrl.services.token2wav.tokens import VOCABULARY

    pairs = [(r["tokens"], r["text"]) for r in read_corpus(corpus, "train")]
    model_config = token2reward.Token2RewardConfig(num_tokens=len(VOCABULARY), d_model=96, layers=2, heads=4)

    def log(step: int, loss: float) -> None:
        if step % 50 == 0 or step == config.token2reward_steps - 1:
            print(f"  token2reward step {step + 1}/{config.token2reward_steps} ctc {loss:.3f}", flush=True)

    model = train_token2reward(pairs, model_config, steps=config.token2reward_steps, seed=config.seed, log=log)
    token2reward.save(model, out)
    return out


def prepare(config: TtsReproConfig, out: Path, stages: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Corpus + warm start and Token2Reward, built once per out folder (a rerun reuses them, naming the
    wall time they took when built)."""
    built_file = out / "prepared.json"
    built = json.loads(built_file.read_text()) if built_file.exists() else {}
    if "warm start" not in built:
        print("[1/5] corpus + warm start", flush=True)
        with stage_timer(stages, "corpus + warm start"):
            built["warm"] = run_tts_warmstart(TtsWarmStartConfig(
                out=str(out / "warm"), train=config.train, dev=20, test=config.test, steps=config.warmstart_steps,
                seed=config.seed))
        built["warm start"] = stages["corpus + warm start"]
        built_file.write_text(json.dumps(built, indent=2) + "\n")
    if "token2reward" not in built:
        print("[2/5] Token2Reward", flush=True)
        with stage_timer(stages, "token2reward"):
            train_reward_model(config, Path(built["warm"]["corpus"]), out / "token2reward")
        built["token2reward"] = stages["token2reward"]
        built_file.write_text(json.dumps(built, indent=2) + "\n")
    for name, key in (("corpus + warm start", "warm start"), ("token2reward", "token2reward")):
        stages.setdefault(name, f"reused (built in {built[key] / 60:.1f} min)")
    print(f"  warm start: {built['warm']}", flush=True)
    return built["warm"], out / "token2reward"


def job_config(config: TtsReproConfig, warm: dict[str, Any], reward_model: Path, out_dir: Path,
               grpo: dict[str, Any], kind: str = "tts-grpo") -> TtsJobConfig:
    """The job of one system (kind sets the loss); the baseline's only serves the evaluation's settings."""
    ports = {name: os.environ[f"SPEECHRL_{name.upper()}_PORT"] for name in STACK}
    _, job = parse_job(dict(
        kind=kind, policy=warm["policy"], data=warm["corpus"], token2reward=str(reward_model), voices=config.voices,
        steps=config.steps, checkpoint_every=config.steps, out_dir=str(out_dir), seed=config.seed,
        redis_url=stack.redis_url(), **{name: f"127.0.0.1:{port}" for name, port in ports.items()},
        grpo={"group_size": config.group_size, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
              "mini_batch_size": config.group_size * config.batch_size, "kl_beta": config.kl_beta,
              "diffro_beta": config.diffro_beta, "diffro_lambda": config.diffro_lambda,
              "temperature": config.temperature, "max_completion_length": 160, "seed": config.seed,
              "reward_weights": {"intelligibility": 1.0, "speaker": 0.5, "duration": 0.2}, **grpo}))
    assert isinstance(job, TtsJobConfig)
    return job


async def evaluate_system(job: TtsJobConfig, prompts: Sequence[Prompt], temperature: float) -> dict[str, float]:
    """Test-set synthesis of the rollout service's current weights at `temperature` (0: greedy), scored
    for WER and SIM."""
    layout = TtsLayout.load(job.policy)
    async with TtsServices.connect(job) as services:
        return await evaluate(services, job, prompts, layout, await speaker_references(services, job), temperature)


def run(config: TtsReproConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started, stages = time.monotonic(), dict[str, Any]()
    if config.threads:
        torch.set_num_threads(config.threads)
    warm, reward_model = prepare(config, out, stages)
    env = {"SPEECHRL_HOME": str(out / "stack"), "SPEECHRL_ROLLOUT_MODEL_PATH": str(Path(warm["policy"]).resolve()),
           # token2wav also serves the Token2Reward (ScoreTokens): a tts job's token2reward component can use it
           "SPEECHRL_TOKEN2WAV_TOKEN2REWARD": str(reward_model.resolve()),
           **{f"SPEECHRL_{name.upper()}_PORT": str(free_port()) for name in STACK}}
    os.environ.update(env)  # private ports: never collide with a stack the user already runs
    paths = stack.StackPaths(Path(env["SPEECHRL_HOME"]).resolve())
    print("[3/5] starting the services", flush=True)
    voices = [v.strip() for v in config.voices.split(",")]
    test_rows = read_corpus(warm["corpus"], "test")[:config.test]
    test = [Prompt(r["text"], voices[i % len(voices)]) for i, r in enumerate(test_rows)]
    table: dict[str, dict[str, float]] = {}
    ceiling: dict[str, float] | None = None
    with contextlib.ExitStack() as services:
        with stage_timer(stages, "services up"):
            services.enter_context(stack.running(STACK, paths, timeout=300))
        with stage_timer(stages, "eval ceiling"):
            ceiling = asyncio.run(evaluate_ceiling(job_config(config, warm, reward_model, out / "baseline", {}), test,
                                                   [r["tokens"] for r in test_rows]))
        print(f"[4/5] evaluating the warm start on {len(test)} test sentences", flush=True)
        baseline = job_config(config, warm, reward_model, out / "baseline", {})
        with stage_timer(stages, "eval baseline"):
            table["warm start (baseline)"] = asyncio.run(evaluate_system(baseline, test, config.eval_temperature))
        print(f"  {table['warm start (baseline)']}", flush=True)
        print(f"[5/5] RL runs: {config.systems}", flush=True)
        for name in config.systems.split(","):
            kind, grpo = SYSTEMS[name]
            job = job_config(config, warm, reward_model, out / name.replace(" ", "_").replace("+", "_"), grpo, kind)
            with stage_timer(stages, name):
                run_job(kind, job, LineProgress(name, PROGRESS_KEYS))
            with stage_timer(stages, f"eval {name}"):
                table[name] = asyncio.run(evaluate_system(job, test, config.eval_temperature))
            print(f"  {name}: {table[name]}", flush=True)
    minutes = round((time.monotonic() - started) / 60, 1)
    results = {"config": asdict(config), "minutes": minutes, "stages_seconds": stages, "warm_start": warm,
               "table": table, "ceiling": ceiling}
    write_results(out, results, markdown_table(table, minutes, stages, ceiling))
    plot(table, out, out / "results.png")
    return results


async def evaluate_ceiling(job: TtsJobConfig, prompts: Sequence[Prompt], tokens: Sequence[Sequence[int]]
                           ) -> dict[str, float]:
    """WER and SIM of espeak's own phonemes of the test sentences: what a perfect policy would score here."""
    async with TtsServices.connect(job) as services:
        references = await speaker_references(services, job)
        speech = await render(services, job, tokens, [p.speaker for p in prompts])
        scores = await score(services, job, {"f0": 0.0}, speech, tokens, prompts, references, group_size=1)
    return {"wer": mean_of(scores["wer"]), "sim": mean_of(scores["sim"]),
            "speech_tokens": sum(len(t) for t in tokens) / len(tokens)}


def markdown_table(table: dict[str, dict[str, float]], minutes: float, stages: dict[str, Any],
                   ceiling: dict[str, float] | None = None) -> str:
    lines = ["| system | test WER | SIM | speech tokens / utt |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['wer']:.3f} | {s['sim']:.3f} | {s['speech_tokens']:.1f} |" for name, s in table.items()]
    if ceiling is not None:
        lines += [f"| (ceiling: espeak's own phonemes) | {ceiling['wer']:.3f} | {ceiling['sim']:.3f} | "
                  f"{ceiling['speech_tokens']:.1f} |"]
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {name} | {value / 60:.1f} min |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in stages.items()]
    return "\n".join(lines) + f"\n\nWhole run: {minutes} min.\n"


def plot(table: dict[str, dict[str, float]], out: Path, path: Path) -> None:
    """Bars of test WER and SIM per system; the training reward curves of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wer, sim, curves) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(table)
    for axis, key, label in ((wer, "wer", "test WER (greedy, Whisper tiny.en)"), (sim, "sim", "SIM (raw cosine)")):
        axis.bar(range(len(names)), [table[n][key] for n in names], color="tab:blue" if key == "wer" else "tab:green")
        axis.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
        axis.set_title(label)
    diffro_axis = None
    for name in names[1:]:
        metrics = out / name.replace(" ", "_").replace("+", "_") / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if rows and rows[0]["reward/intelligibility"] == rows[0]["reward/intelligibility"]:  # NaN: not computed
            curves.plot([r["step"] for r in rows], [r["reward/intelligibility"] for r in rows], label=name)
        elif rows:  # DiffRO alone: its reward is log P(text | tokens), on its own axis
            diffro_axis = diffro_axis or curves.twinx()
            diffro_axis.plot([r["step"] for r in rows], [r["diffro_reward"] for r in rows], "k--", label=name)
            diffro_axis.set_ylabel("DiffRO log P(text | tokens)")
    curves.set_ylabel("intelligibility reward (1 - WER)")
    curves.set_xlabel("step")
    curves.set_title("mean reward of the rollouts")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_config(TtsReproConfig, "tts_repro", argv, description=__doc__.splitlines()[0],
                     prog="python -m speechrl.trainer.recipes.reproduce_tts"))


if __name__ == "__main__":
    main()


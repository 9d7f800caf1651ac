"""DiffRO's table (arXiv 2507.05911) at small scale, on this CPU, real audio and real scorers end to end,
with a speaker reward that can act, over several RL seeds.

    python -m speechrl.trainer.recipes.reproduce_tts --out runs/tts-repro        # < 20 min on 2 cores

1. Corpus + warm start (tts_warmstart.py): asr_data.py's sentences, espeak-ng's phonemes as speech
   tokens, a small Qwen2 TTS policy trained on them with substituted / dropped targets, stopped early.
   Every target begins with a voice token (tokens.VOICE_TOKENS: m1, m3, m6 or m7, the espeak variant
   token2wav speaks it in) drawn uniformly, so the warm start's voice is not the prompt speaker's.
2. Token2Reward (token2reward.py): DiffRO's reward, trained on the corpus's (tokens, text) pairs as
   the policy samples them: a voice token first, and half of them corrupted at the rates the warm
   start's own samples differ from espeak's phonemes, so log P(text | tokens) is calibrated where
   DiffRO reads it.
3. The services: rollout (the policy), token2wav (espeak-ng renders the tokens, in the voice their
   voice token names), intelligibility (Whisper tiny.en) and speaker (Resemblyzer), as `speechrl up`
   starts them, on private ports.
4. Runs from the one warm start, once per seed: GRPO (1 - WER, SIM and duration rewards), GRPO without
   the SIM reward, DiffRO (Token2Reward only: no ASR in the loop), GRPO+DiffRO without the sample
   filter, GRPO+DiffRO with it.
5. Each run, and the warm start (baseline), synthesises the held-out test sentences greedily;
   token2wav renders them, Whisper scores WER and the speaker scorer SIM against the prompt voice
   (en-us+m7: its reference audio is espeak's own phonemes in that voice). espeak's own phonemes of
   the test sentences, rendered and scored the same way, are the ceiling of this pipeline (Whisper
   tiny.en on espeak audio is far from WER 0). results.md / results.json: every run's row and each
   system's mean ± spread over the seeds; results.png: the bars with their spread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
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
from speechrl.services.token2wav.tokens import VOCABULARY, VOICE_TOKENS
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.datasets import read_corpus
from speechrl.trainer.jobs.progress import LineProgress, mean_of
from speechrl.trainer.jobs.registry import parse_job, run_job
from speechrl.trainer.jobs.tts import Prompt, TtsJobConfig, TtsServices, evaluate, render, score, speaker_references
from speechrl.trainer.models.tts_policy import TtsLayout, TtsPolicy
from speechrl.trainer.recipes.reporting import mean_spread, over_seeds, parse_seeds, stage_timer, write_results
from speechrl.trainer.recipes.token2reward import train as train_token2reward
from speechrl.trainer.recipes.tts_warmstart import TtsWarmStartConfig, noisy_target, run_tts_warmstart, voice_ids

STACK = ("intelligibility", "speaker", "rollout", "token2wav")
# system -> (job kind, GRPOConfig overrides); reward_weights here update the run's (reward_weights below).
SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "GRPO": ("tts-grpo", {}),
    "GRPO (no SIM reward)": ("tts-grpo", {"reward_weights": {"speaker": 0.0}}),
    "DiffRO": ("tts-diffro", {"reward_weights": {"intelligibility": 0.0, "speaker": 0.0}}),
    "GRPO+DiffRO (no filter)": ("tts-grpo+diffro", {"diffro_filter": False}),
    "GRPO+DiffRO (filter)": ("tts-grpo+diffro", {"diffro_filter": True}),
}
BASELINE = "warm start (baseline)"
METRICS = (("wer", "test WER"), ("sim", "SIM"), ("prompt_voice", "P(prompt voice)"),
           ("speech_tokens", "speech tokens / utt"))


@dataclass
class TtsReproConfig:
    """Sizes of the TTS reproduction; the defaults fit < 20 minutes on 2 CPU cores."""

    out: str = option("runs/tts-repro", "Run folder: warm/ (corpus, policy), token2reward/, one folder per run, "
                                        "results.*")
    systems: str = option(",".join(SYSTEMS), f"Comma-separated systems, of {', '.join(SYSTEMS)}.")
    seeds: str = option("0,1,2", "Seeds of the RL runs (rollout sampling, prompt order, Gumbel noise), "
                                 "comma-separated: every system runs once per seed from the one warm start and "
                                 "Token2Reward, and the table gives each system's mean and spread over them.")
    train: int = option(600, "Training sentences (warm start, Token2Reward, RL prompts).")
    test: int = option(30, "Held-out test sentences (the reported WER / SIM): Whisper costs ~0.35-1 s each.")
    warmstart_steps: int = option(150, "Warm-start updates: stopped early on purpose, so RL has room.")
    voice_tokens: str = option(",".join(VOICE_TOKENS), "Voice tokens the warm start draws uniformly for every "
                                                       "target (tokens.VOICE_TOKENS); empty: none, and token2wav "
                                                       "speaks every sample in the prompt voice.")
    token2reward_steps: int = option(300, "Token2Reward training updates.")
    token2reward_noise: float = option(0.5, "Share of Token2Reward's training draws whose tokens are corrupted "
                                            "(token2reward_substitute / _drop); every draw begins with a voice token "
                                            "as the policy's samples do. 0: espeak's clean phonemes only.")
    token2reward_substitute: float = option(0.24, "Substitution rate of a corrupted draw: the warm start's own "
                                                  "samples at T 0.3 differ from espeak's phonemes by 24 % "
                                                  "substitutions, 13 % deletions, 5 % insertions (40 sentences).")
    token2reward_drop: float = option(0.13, "Deletion rate of a corrupted draw (see token2reward_substitute).")
    steps: int = option(10, "RL steps per run.")
    group_size: int = option(8, "G: samples per text (the paper's 8: a group mean of 4 noisy WERs is a poor baseline).")
    batch_size: int = option(2, "Texts per step: G * batch_size samples go through Whisper each step.")
    learning_rate: float = option(1e-4, "RL learning rate (AdamW moves every weight ~lr per step whatever the "
                                        "gradient's size: 2e-4 drifted the tiny policy to KL 0.09 in 8 steps).")
    kl_beta: float = option(0.05, "GRPO's KL coefficient.")
    diffro_beta: float = option(0.5, "DiffRO's token-level KL coefficient beta, ten times the first reproduction's "
                                     "0.05, under which the KL grew to 3-4 nats a sentence in 10 steps against R's "
                                     "~100 nats. Measured on one seed each: 2 kept the KL at 1.1-3.8 without a "
                                     "better WER.")
    temperature: float = option(0.3, "Rollout temperature. The first warm start's samples at 0.3 had mean WER ~0.71 "
                                     "(this one's 0.81) and spread within every group; at 0.5-0.7 more of them "
                                     "reach WER >= 1, where 1 - WER is clipped to 0 and the group has nothing to "
                                     "compare.")
    diffro_lambda: float = option(0.002, "lambda of the DiffRO term in GRPO+DiffRO. Its R is a sum over a sentence's "
                                         "characters (~100-300 nats; gradient norm ~1000-2000 against GRPO's ~2.5), "
                                         "so 0.002 puts the filtered term (about half the samples) at GRPO's scale.")
    sim_weight: float = option(1.0, "Weight of the SIM reward (raw cosine to the prompt voice) where GRPO acts; "
                                    "1 - WER weighs 1 and duration 0.2. The right voice token is worth ~0.2 of "
                                    "cosine (tokens.VOICE_VARIANTS).")
    voices: str = option("en-us+m7", "espeak voices (speaker prompts), round-robin over texts. The policy sees only "
                                     "the text, so with one voice the SIM reward has one voice token to find.")
    threads: int = option(1, "torch threads of this process (warm start, Token2Reward, RL updates); 0 leaves "
                             "torch's default. On a shared 2-core machine 1 thread trained Token2Reward 3.8x faster "
                             "than 2 (0.36 vs 1.35 s per step) while the services ran beside it.")
    eval_temperature: float = option(0.0, "Test synthesis temperature (0: greedy), the same seed for every system.")
    seed: int = option(0, "Seed of the corpus, the warm start and Token2Reward.")

    def __post_init__(self) -> None:
        unknown = [name for name in self.systems.split(",") if name not in SYSTEMS]
        if unknown:
            raise ValueError(f"systems {unknown} are not among {list(SYSTEMS)}")
        parse_seeds(self.seeds)
        voice_ids(self.voice_tokens)


# One line per RL step; components a run does not compute are NaN and left out.
PROGRESS_KEYS = ("reward_mean", "reward/intelligibility", "wer", "sim", "diffro_reward", "kl", "diffro_kl")


def train_reward_model(config: TtsReproConfig, corpus: Path, out: Path) -> Path:
    """Token2Reward on the training split's (tokens, text) pairs as the policy samples them (reused when present):
    a voice token first, and token2reward_noise of the draws corrupted at the warm start's own error rates."""
    if (out / token2reward.CHECKPOINT).exists():
        return out
    pairs = [(r["tokens"], r["text"]) for r in read_corpus(corpus, "train")]
    model_config = token2reward.Token2RewardConfig(num_tokens=len(VOCABULARY), d_model=96, layers=2, heads=4)
    voices = voice_ids(config.voice_tokens)

    def augment(tokens: Sequence[int], rng: random.Random) -> list[int]:
        noised = rng.random() < config.token2reward_noise
        return noisy_target(tokens, rng, config.token2reward_substitute * noised, config.token2reward_drop * noised,
                            voices)

    def log(step: int, loss: float) -> None:
        if step % 50 == 0 or step == config.token2reward_steps - 1:
            print(f"  token2reward step {step + 1}/{config.token2reward_steps} ctc {loss:.3f}", flush=True)

    model = train_token2reward(pairs, model_config, steps=config.token2reward_steps, seed=config.seed, log=log,
                               augment=augment)
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
                voice_tokens=config.voice_tokens, seed=config.seed))
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


def reward_weights(config: TtsReproConfig, system: str) -> dict[str, float]:
    """A system's reward weights: 1 - WER 1, SIM sim_weight, duration 0.2, updated by the system's own.

    >>> reward_weights(TtsReproConfig(), "GRPO (no SIM reward)")
    {'intelligibility': 1.0, 'speaker': 0.0, 'duration': 0.2}
    """
    return {"intelligibility": 1.0, "speaker": config.sim_weight, "duration": 0.2,
            **SYSTEMS[system][1].get("reward_weights", {})}


def job_config(config: TtsReproConfig, warm: dict[str, Any], reward_model: Path, out_dir: Path,
               system: str = "GRPO", seed: int | None = None) -> TtsJobConfig:
    """The job of one run of system (its kind sets the loss; seed, default config.seed, its sampling); the
    baseline's only serves the evaluation's settings."""
    ports = {name: os.environ[f"SPEECHRL_{name.upper()}_PORT"] for name in STACK}
    seed = config.seed if seed is None else seed
    kind, grpo = SYSTEMS[system]
    overrides = {**grpo, "reward_weights": reward_weights(config, system)}
    _, job = parse_job(dict(
        kind=kind, policy=warm["policy"], data=warm["corpus"], token2reward=str(reward_model), voices=config.voices,
        steps=config.steps, checkpoint_every=config.steps, out_dir=str(out_dir), seed=seed,
        redis_url=stack.redis_url(), **{name: f"127.0.0.1:{port}" for name, port in ports.items()},
        grpo={"group_size": config.group_size, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
              "mini_batch_size": config.group_size * config.batch_size, "kl_beta": config.kl_beta,
              "diffro_beta": config.diffro_beta, "diffro_lambda": config.diffro_lambda,
              "temperature": config.temperature, "max_completion_length": 160, "seed": seed, **overrides}))
    assert isinstance(job, TtsJobConfig)
    return job


async def evaluate_system(job: TtsJobConfig, prompts: Sequence[Prompt], temperature: float) -> dict[str, float]:
    """Test-set synthesis of the rollout service's current weights at `temperature` (0: greedy), scored
    for WER and SIM."""
    layout = TtsLayout.load(job.policy)
    async with TtsServices.connect(job) as services:
        return await evaluate(services, job, prompts, layout, await speaker_references(services, job), temperature)


@torch.no_grad()
def prompt_voice_probability(policy_folder: str | Path, prompts: Sequence[Prompt]) -> float:
    """Mean probability (temperature 1) that the policy's first speech token is the voice token of its prompt's
    voice ("+m7" for en-us+m7): what the SIM reward moves, seen before greedy decoding turns it into one voice
    or another. NaN when no prompt's voice has a voice token."""
    policy = TtsPolicy.load(policy_folder)
    layout = policy.layout
    assert isinstance(layout, TtsLayout)
    probabilities = []
    for prompt in prompts:
        token = "+" + prompt.speaker.partition("+")[2]
        if token in VOICE_TOKENS:
            logits = policy.model(input_ids=torch.tensor([layout.prompt_ids(prompt.text)])).logits[0, -1]  # [V]
            probabilities.append(float(torch.softmax(logits, -1)[layout.speech_offset + VOCABULARY.index(token)]))
    return mean_of(probabilities)


def evaluate_run(job: TtsJobConfig, prompts: Sequence[Prompt], temperature: float) -> dict[str, float]:
    """evaluate_system's scores of the served weights, and the prompt voice's probability under the run's newest
    checkpoint (the warm start when it has none: the baseline)."""
    newest = latest_checkpoint(job.out_dir)
    scores = asyncio.run(evaluate_system(job, prompts, temperature))
    return {**scores, "prompt_voice": prompt_voice_probability(newest / "policy" if newest else job.policy, prompts)}


async def evaluate_ceiling(job: TtsJobConfig, prompts: Sequence[Prompt], tokens: Sequence[Sequence[int]]
                           ) -> dict[str, float]:
    """WER and SIM of espeak's own phonemes of the test sentences: what a perfect policy would score here."""
    async with TtsServices.connect(job) as services:
        references = await speaker_references(services, job)
        speech = await render(services, job, tokens, [p.speaker for p in prompts])
        scores = await score(services, job, {"f0": 0.0}, speech, tokens, prompts, references, group_size=1)
    return {"wer": mean_of(scores["wer"]), "sim": mean_of(scores["sim"]), "prompt_voice": float("nan"),
            "speech_tokens": sum(len(t) for t in tokens) / len(tokens)}


def run_label(system: str, seed: int) -> str:
    """A run's row in the table ("GRPO, seed 1"; run_folder makes it a folder name)."""
    return f"{system}, seed {seed}"


def run_folder(out: Path, label: str) -> Path:
    """A run's folder under out: "GRPO+DiffRO (filter), seed 1" -> GRPO_DiffRO_(filter)_seed_1."""
    return out / label.replace(" ", "_").replace("+", "_").replace(",", "")


def cpu_minutes(paths: stack.StackPaths) -> float:
    """CPU minutes (user + system, with reaped children such as espeak) of this process and of the stack's
    services so far: the run's cost without the jobs that share its cores, which inflate its wall time
    (a 2-core machine of its own needs at least half of it)."""
    import psutil

    pids = [os.getpid(), *(pid for name in STACK if (pid := stack.read_pid(paths.pid_file(name))) is not None)]
    times = [psutil.Process(pid).cpu_times() for pid in pids]
    return sum(t.user + t.system + t.children_user + t.children_system for t in times) / 60


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
    systems, seeds = config.systems.split(","), parse_seeds(config.seeds)
    table: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as services:
        with stage_timer(stages, "services up"):
            services.enter_context(stack.running(STACK, paths, timeout=300))
        baseline = job_config(config, warm, reward_model, out / "baseline")
        with stage_timer(stages, "eval ceiling"):
            ceiling = asyncio.run(evaluate_ceiling(baseline, test, [r["tokens"] for r in test_rows]))
        print(f"[4/5] evaluating the warm start on {len(test)} test sentences", flush=True)
        with stage_timer(stages, "eval baseline"):
            table[BASELINE] = evaluate_run(baseline, test, config.eval_temperature)
        print(f"  {table[BASELINE]}", flush=True)
        print(f"[5/5] RL runs: {config.systems}; seeds {config.seeds}", flush=True)
        for seed in seeds:
            for name in systems:
                label = run_label(name, seed)
                job = job_config(config, warm, reward_model, run_folder(out, label), name, seed)
                with stage_timer(stages, label):
                    run_job(SYSTEMS[name][0], job, LineProgress(label, PROGRESS_KEYS))
                with stage_timer(stages, f"eval {label}"):
                    table[label] = evaluate_run(job, test, config.eval_temperature)
                print(f"  {label}: {table[label]}", flush=True)
        cpu = round(cpu_minutes(paths), 1)
    summary = {name: over_seeds([table[run_label(name, seed)] for seed in seeds]) for name in systems}
    minutes = round((time.monotonic() - started) / 60, 1)
    results = {"config": asdict(config), "minutes": minutes, "cpu_minutes": cpu, "stages_seconds": stages,
               "warm_start": warm, "table": table, "ceiling": ceiling,
               "over_seeds": {name: {k: list(v) for k, v in s.items()} for name, s in summary.items()}}
    write_results(out, results, markdown_table(table, summary, minutes, stages, ceiling, cpu))
    plot(table, summary, out, out / "results.png")
    return results


def markdown_table(table: dict[str, dict[str, float]], summary: dict[str, dict[str, tuple[float, float]]],
                   minutes: float, stages: dict[str, Any], ceiling: dict[str, float] | None = None,
                   cpu: float | None = None) -> str:
    """Each system's mean ± spread over the seeds (the warm start: one, greedy, so no spread), then every run."""
    header = "| system | " + " | ".join(label for _, label in METRICS) + " |"
    rule = "|---|" + "---|" * len(METRICS)
    lines = ["Mean ± spread (sample standard deviation) over the RL seeds; the warm start is one model, "
             "evaluated greedily once.", "", header, rule,
             f"| {BASELINE} | " + " | ".join(f"{table[BASELINE][key]:.3f}" for key, _ in METRICS) + " |"]
    lines += [f"| {name} | " + " | ".join(mean_spread(stats[key]) for key, _ in METRICS) + " |"
              for name, stats in summary.items()]
    if ceiling is not None:  # espeak's phonemes carry no voice token: they are spoken in the prompt voice
        lines.append("| (ceiling: espeak's own phonemes) | " + " | ".join(
            "-" if math.isnan(ceiling[key]) else f"{ceiling[key]:.3f}" for key, _ in METRICS) + " |")
    lines += ["", "Every run:", "", header, rule]
    lines += [f"| {name} | " + " | ".join(f"{scores[key]:.3f}" for key, _ in METRICS) + " |"
              for name, scores in table.items() if name != BASELINE]
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {name} | {value / 60:.1f} min |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in stages.items()]
    used = "" if cpu is None else f" CPU time (this process and its services): {cpu} min."
    return "\n".join(lines) + f"\n\nWhole run: {minutes} min.{used}\n"


def plot(table: dict[str, dict[str, float]], summary: dict[str, dict[str, tuple[float, float]]], out: Path,
         path: Path) -> None:
    """Bars of test WER and SIM per system at its mean over the seeds, the spread as an error bar and each
    run a dot; the training reward curves of each system's first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wer, sim, curves) = plt.subplots(1, 3, figsize=(17, 4.8))
    names = [BASELINE, *summary]
    for axis, key, label in ((wer, "wer", "test WER (greedy, Whisper tiny.en)"),
                             (sim, "sim", "SIM (raw cosine to the prompt voice)")):
        means = [table[BASELINE][key], *(summary[n][key][0] for n in summary)]
        spreads = [0.0, *(summary[n][key][1] for n in summary)]
        axis.bar(range(len(names)), means, yerr=spreads, capsize=4, color="tab:blue" if key == "wer" else "tab:green")
        for i, name in enumerate(summary, start=1):
            runs = [scores[key] for run, scores in table.items() if run.startswith(f"{name}, seed ")]
            axis.plot([i] * len(runs), runs, "o", color="black", ms=3)
        axis.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
        axis.set_title(f"{label}, mean ± spread over seeds", fontsize=9)
    diffro_axis = None
    for name in summary:
        first = next(run for run in table if run.startswith(f"{name}, seed "))
        metrics = run_folder(out, first) / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if rows and rows[0]["reward/intelligibility"] == rows[0]["reward/intelligibility"]:  # NaN: not computed
            curves.plot([r["step"] for r in rows], [r["reward/intelligibility"] for r in rows], label=first)
        elif rows:  # DiffRO alone: its reward is log P(text | tokens), on its own axis
            diffro_axis = diffro_axis or curves.twinx()
            diffro_axis.plot([r["step"] for r in rows], [r["diffro_reward"] for r in rows], "k--", label=first)
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

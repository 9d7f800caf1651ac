"""Supervised warm start of the LLM-TTS policy on espeak-ng's own text -> phoneme output, errors left in.

1. Sentences from asr_data.py's templates, split train / dev / test (disjoint), phonemized by espeak-ng
   (PhonemeVocabulary.text_to_ids) into clean speech tokens; written to corpus.jsonl, one
   {"text", "tokens", "split"} a line (the RL prompts, the test set and Token2Reward's pairs).
2. The training targets are corrupted on purpose: each token is substituted by a random phoneme
   with probability `substitute` and dropped with probability `drop`, fresh every epoch, and
   training stops after `steps` updates, well before convergence. The policy that comes out
   mostly speaks right but spreads probability over wrong phonemes: room for RL to sharpen it.
3. Each target begins with a voice token (tokens.VOICE_TOKENS: the espeak variant token2wav speaks
   it in) drawn uniformly from `voice_tokens`, fresh every epoch: the policy learns a voice
   distribution that knows nothing of the prompt speaker, which only a speaker reward can correct.

    python -m speechrl.trainer.recipes.tts_warmstart --out runs/tts-warmstart --sentences 600 --steps 300
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speechrl.services.config import option, parse_config
from speechrl.services.token2wav.tokens import PHONEMES, SPOKEN, VOCABULARY, VOICE_TOKENS, PhonemeVocabulary
from speechrl.trainer.core.policy import supervised_step
from speechrl.trainer.jobs.datasets import CORPUS
from speechrl.trainer.models.tts_policy import TtsLayout, TtsPolicy
from speechrl.trainer.recipes import asr_data
from speechrl.trainer.recipes.asr_data import generate_sentences

SPLITS = ("train", "dev", "test")


@dataclass
class TtsWarmStartConfig:
    """Corpus and supervised warm start of the LLM-TTS policy; defaults take ~2 minutes on 2 cores."""

    out: str = option("runs/tts-warmstart", "Folder: corpus.jsonl, policy/ (the checkpoint), warmstart.json.")
    train: int = option(600, "Training sentences.")
    dev: int = option(40, "Dev sentences (teacher-forced token accuracy after training).")
    test: int = option(40, "Held-out test sentences (the reproduction's test set).")
    hidden_size: int = option(128, "LM hidden size (a multiple of 64).")
    num_layers: int = option(2, "LM layers.")
    steps: int = option(300, "Updates; stopped early on purpose so RL has room.")
    batch_size: int = option(32, "Sentences per update.")
    learning_rate: float = option(3e-3, "AdamW peak learning rate (linear warm-up, cosine decay).")
    substitute: float = option(0.08, "Probability that a target token is replaced by a random phoneme.")
    drop: float = option(0.04, "Probability that a target token is dropped.")
    voice_tokens: str = option(",".join(VOICE_TOKENS), "Voice tokens (tokens.VOICE_TOKENS), comma-separated: each "
                                                       "target begins with one drawn uniformly. Empty: no voice "
                                                       "token (token2wav speaks the prompt's voice).")
    threads: int = option(0, "torch threads; 0 leaves torch's default.")
    seed: int = option(0, "Seed of sentences, corruption and initialisation.")


def corpus_words() -> tuple[str, ...]:
    """Every word asr_asr_data.py's sentence templates can produce, sorted (the policy's text vocabulary)."""
    words: set[str] = set()
    for template in (*asr_data.TEMPLATES, *asr_data.KEYWORD_TEMPLATES):
        words.update(w for w in template.split() if not w.startswith("{"))
    for group in (asr_data.NAMES, asr_data.NUMBERS, asr_data.PLACES, asr_data.OBJECTS, asr_data.OBJECTS.values(), asr_data.ADJECTIVES,
                  asr_data.ACTIONS, asr_data.TIMES, asr_data.KEYWORDS):
        words.update(group)
    return tuple(sorted(words))


def phonemize(texts: Sequence[str], workers: int = 4) -> list[list[int]]:
    """espeak-ng's speech tokens of each text (one espeak process per text, a few at a time)."""
    vocabulary = PhonemeVocabulary()
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(vocabulary.text_to_ids, texts))


def build_corpus(out: Path, config: TtsWarmStartConfig) -> list[dict[str, Any]]:
    """corpus.jsonl under out (reused when present): sentences, their clean tokens and split."""
    path = out / CORPUS
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    counts = {"train": config.train, "dev": config.dev, "test": config.test}
    sentences = [text for text, _ in generate_sentences(sum(counts.values()), seed=config.seed)]
    splits = [name for name in SPLITS for _ in range(counts[name])]
    rows = [{"text": t, "tokens": ids, "split": s} for t, ids, s in zip(sentences, phonemize(sentences), splits,
                                                                           strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def corrupt(tokens: Sequence[int], rng: random.Random, substitute: float, drop: float) -> list[int]:
    """tokens with each one substituted by a random phoneme (p=substitute) or dropped (p=drop).

    >>> corrupt([5, 6, 7], random.Random(0), 0.0, 0.0)
    [5, 6, 7]
    """
    first_phoneme = len(SPOKEN) - len(PHONEMES)  # boundaries, stress marks, voice tokens: never substituted in
    out = []
    for token in tokens:
        roll = rng.random()
        if roll < drop:
            continue
        out.append(rng.randrange(first_phoneme, len(SPOKEN)) if roll < drop + substitute else token)
    return out


def voice_ids(voice_tokens: str) -> list[int]:
    """Token ids of a comma-separated list of VOICE_TOKENS ("" -> []).

    >>> [VOCABULARY[i] for i in voice_ids("+m1, +m7")]
    ['+m1', '+m7']
    """
    names = [v.strip() for v in voice_tokens.split(",") if v.strip()]
    unknown = [v for v in names if v not in VOICE_TOKENS]
    if unknown:
        raise ValueError(f"voice tokens {unknown} are not among tokens.VOICE_TOKENS {VOICE_TOKENS}")
    return [VOCABULARY.index(v) for v in names]


def noisy_target(tokens: Sequence[int], rng: random.Random, substitute: float, drop: float,
                 voices: Sequence[int] = ()) -> list[int]:
    """A warm-start target: corrupt(tokens), after a voice token drawn uniformly from voices (none if empty).

    >>> noisy_target([5, 6, 7], random.Random(0), 0.0, 0.0, voices=[80])
    [80, 5, 6, 7]
    """
    return ([rng.choice(voices)] if voices else []) + corrupt(tokens, rng, substitute, drop)


def train(policy: TtsPolicy, rows: Sequence[dict[str, Any]], config: TtsWarmStartConfig,
          log: Callable[[int, float], None] | None = None) -> None:
    """Teacher-forced cross-entropy on corrupted targets for config.steps updates."""
    rng = random.Random(config.seed)
    voices = voice_ids(config.voice_tokens)
    model = policy.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for step in range(config.steps):
        chosen = [rows[rng.randrange(len(rows))] for _ in range(config.batch_size)]
        ids, mask, labels = policy.sequences(
            [policy.layout.prompt_ids(r["text"]) for r in chosen],
            [noisy_target(r["tokens"], rng, config.substitute, config.drop, voices) for r in chosen])  # [B, L] each
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # [] mean over target tokens
        value = supervised_step(model, optimizer, loss, schedule=schedule)
        if log is not None:
            log(step, value)
    model.eval()


@torch.no_grad()
def token_accuracy(policy: TtsPolicy, rows: Sequence[dict[str, Any]], voices: Sequence[int] = ()) -> float:
    """Teacher-forced accuracy of the argmax next token on the clean targets (incl. <eos>); with voices, each
    target begins with voices[0], a position not counted (the warm start's voice is a uniform draw)."""
    if not rows:
        return math.nan
    prompts = [policy.layout.prompt_ids(r["text"]) for r in rows]
    ids, mask, labels = policy.sequences(prompts, [[*voices[:1], *r["tokens"]] for r in rows])  # [B, L] each
    if voices:
        labels[torch.arange(len(rows)), torch.tensor([len(p) for p in prompts])] = -100  # [B, L] the voice's out
    logits = policy.model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, L-1, V]
    targets = labels[:, 1:]  # [B, L-1]
    counted = targets != -100  # [B, L-1]
    return float(((logits.argmax(-1) == targets) & counted).sum() / counted.sum())


def run_tts_warmstart(config: TtsWarmStartConfig) -> dict[str, Any]:
    """Corpus + warm start into config.out; returns the summary written to warmstart.json."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    start = time.perf_counter()
    rows = build_corpus(out, config)
    corpus_seconds = time.perf_counter() - start
    layout = TtsLayout(words=corpus_words(), num_speech=len(VOCABULARY))
    policy = TtsPolicy.build(layout, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=config.seed)
    losses: list[float] = []

    def log(step: int, loss: float) -> None:
        losses.append(loss)
        if step % 50 == 0 or step == config.steps - 1:
            print(f"warm start step {step + 1}/{config.steps} loss {loss:.3f}", flush=True)

    train(policy, [r for r in rows if r["split"] == "train"], config, log)
    policy.save(out / "policy")
    summary = {"corpus_seconds": corpus_seconds, "train_seconds": time.perf_counter() - start - corpus_seconds,
               "final_loss": losses[-1],
               "dev_token_accuracy": token_accuracy(policy, [r for r in rows if r["split"] == "dev"],
                                                    voice_ids(config.voice_tokens)),
               "policy": str(out / "policy"), "corpus": str(out / CORPUS)}
    (out / "warmstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(TtsWarmStartConfig, "tts_warmstart", argv, description=__doc__.splitlines()[0],
                          prog="python -m speechrl.trainer.recipes.tts_warmstart")
    print(json.dumps(run_tts_warmstart(config), indent=2))


if __name__ == "__main__":
    main()

"""Supervised warm start of the small LLM-ASR: cross-entropy on transcripts, before any RL.

    python -m speechrl.trainer.recipes.warmstart --data runs/asr-data --out runs/asr-warmstart --epochs 6

1. Build the tokenizer (BPE over the training sentences) and a random Qwen2 LM (asr_policy).
2. Embed every utterance once with the frozen front-end; the embeddings are cached on disk
   under DATA/embeddings/<front-end key>/<split>.safetensors, so reruns skip the encoder.
3. Train the LM on the train split (AdamW, warmup + cosine, gradient clipping), the loss on the
   transcript tokens and EOS only (the prompt layout of asr_policy), for `epochs` or until
   `max_train_seconds`, whichever comes first: stopping early on purpose leaves RL room to improve.
4. Greedy-decode dev, test and the long splits in batches; WER with speechrl.rewards.error_rates.
5. Save the checkpoint folder (AsrPolicy.save: LM, tokenizer, asr_layout.json, frontend/), the
   metrics (warmstart.json) and each split's hypotheses (hypotheses/<split>.jsonl, the baseline
   that data.select_hard_cases reads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from speechrl.rewards import error_rates, normalize_text, rule_rewards
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.config import option, parse_config
from speechrl.services.encoder.ct2 import CT2_SETTINGS, default_ct2_frontend, load_ct2_encoder
from speechrl.services.encoder.model import ADAPTOR_CONFIG, ADAPTOR_WEIGHTS, AudioEncoderModel
from speechrl.trainer.jobs.datasets import Row, read_manifest
from speechrl.trainer.models.asr_policy import AsrPolicy, build_asr_lm, build_asr_tokenizer

log = logging.getLogger(__name__)

METRICS_FILE = "warmstart.json"


@dataclass
class WarmStartConfig:
    """Every setting of the warm start; each field is a flag of `python -m speechrl.trainer.recipes.warmstart`."""

    data: str = option("runs/asr-data", "Corpus folder (manifest.jsonl, from speechrl.trainer.recipes.asr_data).")
    out: str = option("runs/asr-warmstart", "Checkpoint folder to write.")
    frontend: str = option("", "ct2-whisper front-end folder (adaptor files); empty: tiny.en + the seeded default "
                               "adaptor for hidden_size, built in the cache.")
    hidden_size: int = option(256, "LM hidden size D (a multiple of 64: head dim 64); the front-end's output size.")
    num_layers: int = option(4, "LM decoder layers.")
    vocab_size: int = option(1024, "BPE vocabulary bound; the controlled vocabulary saturates at ~720 (one token per "
                                   "word).")
    epochs: int = option(3, "Passes over the training splits (at most; max_train_seconds may stop it sooner). 3 is "
                            "the deliberate early stop: test WER ~0.3-0.4 leaves RL room, and long inputs still loop.")
    max_train_seconds: float = option(0.0, "Stop training after this many seconds (0: no limit); the early stop "
                                           "that leaves room for RL.")
    train_splits: str = option("train,joined", "Comma-separated splits to train on: single sentences, and the "
                                               "multi-sentence 'joined' segments that teach the LM to go on past a "
                                               "sentence end (missing ones skipped).")
    max_train_utterances: int = option(0, "Use only the first N rows of the training splits (0: all).")
    batch_size: int = option(16, "Utterances per optimizer step.")
    learning_rate: float = option(1e-3, "Peak AdamW learning rate (after warmup; cosine decay to 10%).")
    warmup_steps: int = option(30, "Linear warmup steps.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    eval_splits: str = option("dev,test,long", "Comma-separated splits to decode at the end (missing ones skipped).")
    eval_batch_size: int = option(32, "Utterances per greedy-decoding batch.")
    encode_batch_size: int = option(16, "Utterances per front-end batch when embedding.")
    seed: int = option(0, "Seed of the LM's initialisation and the batch order.")
    threads: int = option(0, "torch and CTranslate2 threads; 0: every core.")
    device: str = option("cpu", "Device of the LM (cuda:0 on a GPU box); the front-end follows it.")

    def __post_init__(self) -> None:
        if self.hidden_size % 64:
            raise ValueError(f"hidden_size must be a multiple of 64 (head dim 64), got {self.hidden_size}")
        if min(self.epochs, self.batch_size, self.eval_batch_size, self.encode_batch_size, self.num_layers) < 1:
            raise ValueError("epochs, batch sizes and num_layers must be >= 1")


# -- embeddings --------------------------------------------------------------------------------


def frontend_key(folder: Path, dtype: str = "float32") -> str:
    """A short hash naming a front-end's embeddings: its adaptor, settings and compute dtype."""
    digest = hashlib.sha1(dtype.encode())
    for name in (ADAPTOR_CONFIG, ADAPTOR_WEIGHTS, CT2_SETTINGS):
        if (folder / name).exists():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def load_clip(row: Row, sample_rate: int) -> Any:
    """16 kHz samples of a row's WAV, decoded as the encoder service decodes uploads."""
    return decode_audio(AudioInput(encoded=Path(row.audio).read_bytes()), sample_rate, 30.0)


def embed_rows(frontend: AudioEncoderModel, rows: Sequence[Row], cache: Path | None = None, batch_size: int = 16,
               desc: str = "embed") -> dict[str, torch.Tensor]:
    """Front-end embeddings [T, D] of every row by id, read from / written to the cache file when given."""
    cached: dict[str, torch.Tensor] = load_file(str(cache)) if cache is not None and cache.exists() else {}
    todo = [r for r in rows if r.id not in cached]
    # Sorted by length, so the CTranslate2 front-end's padding buckets fill whole batches.
    todo.sort(key=lambda r: r.duration)
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not todo):
        batch = todo[start:start + batch_size]
        for row, embeddings in zip(batch, frontend.encode([load_clip(r, frontend.sample_rate) for r in batch]),
                                   strict=True):
            cached[row.id] = embeddings.contiguous()  # [T, D]
    if cache is not None and todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(cached, str(cache))
    return {r.id: cached[r.id] for r in rows}


# -- training ----------------------------------------------------------------------------------


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at step total."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(policy: AsrPolicy, rows: Sequence[Row], embeddings: dict[str, torch.Tensor], config: WarmStartConfig,
          dev: tuple[Sequence[Row], dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Cross-entropy on transcript tokens + EOS; returns losses, steps, time and the per-epoch dev WER."""
    model = policy.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total = steps_per_epoch * config.epochs
    order = random.Random(config.seed)
    losses: list[float] = []
    epoch_losses: list[float] = []
    dev_wer: list[float] = []
    started, step, stopped_early = time.monotonic(), 0, False
    bar = tqdm(total=total, desc="warm start", unit="step")
    for _epoch in range(config.epochs):
        shuffled = list(rows)
        order.shuffle(shuffled)
        epoch: list[float] = []
        for start in range(0, len(shuffled), config.batch_size):
            batch = shuffled[start:start + config.batch_size]
            inputs = policy.inputs([embeddings[r.id] for r in batch], [r.text for r in batch])  # [B, L, D] ...
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * _lr_factor(step, config.warmup_steps, total)
            loss = model(**inputs.model_inputs(), use_cache=False).loss  # mean over label tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            epoch.append(losses[-1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if config.max_train_seconds and time.monotonic() - started > config.max_train_seconds:
                stopped_early = True
                break
        epoch_losses.append(sum(epoch) / len(epoch))
        if dev is not None:
            model.eval()
            dev_wer.append(evaluate(policy, dev[0], dev[1], config.eval_batch_size)[0]["wer"])
            model.train()
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}", dev_wer=f"{dev_wer[-1]:.3f}")
        if stopped_early:
            break
    bar.close()
    model.eval()
    tail = max(1, min(10, len(losses) // 4))  # the mean of the last steps, never reaching back to the first
    return {"steps": step, "train_seconds": round(time.monotonic() - started, 1), "stopped_early": stopped_early,
            "first_loss": losses[0], "last_loss": sum(losses[-tail:]) / tail,
            "epoch_losses": [round(x, 4) for x in epoch_losses], "dev_wer_per_epoch": [round(x, 4) for x in dev_wer]}


# -- evaluation --------------------------------------------------------------------------------


def excess_repeats(hypothesis: str, reference: str, n: int = 4) -> int:
    """Repeated content: n-gram occurrences in the hypothesis beyond max(1, their count in the reference).

    A looping hypothesis that says a whole sentence twice scores its length - n + 1; the rule
    rewards' repeated_ngram only sees back-to-back loops of up to 6 words, shorter than a sentence.

    >>> excess_repeats("the red box the red box the red box", "the red box is here")
    3
    """
    def grams(text: str) -> Counter[tuple[str, ...]]:
        words = normalize_text(text).split()
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    allowed = grams(reference)
    return sum(max(0, count - max(1, allowed[gram])) for gram, count in grams(hypothesis).items())


def evaluate(policy: AsrPolicy, rows: Sequence[Row], embeddings: dict[str, torch.Tensor],
             batch_size: int = 32) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy-decode rows; corpus WER (all errors / all reference words), mean utterance WER, error counts,
    how often the rule rewards' hallucination check fires (any rule; repeated_ngram alone), and repeated
    content (utterances with excess_repeats > 0, and their total). Returns (metrics, one record per row)."""
    # Batches of similar length waste little on padding; records come back in the rows' order.
    order = sorted(range(len(rows)), key=lambda i: rows[i].duration)
    hypotheses: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        for i, text in zip(members, policy.transcribe([embeddings[rows[i].id] for i in members]), strict=True):
            hypotheses[i] = text
    records: list[dict[str, Any]] = []
    totals = {"substitutions": 0, "deletions": 0, "insertions": 0, "words": 0}
    hallucinations = looping = repeated = 0
    for i, row in enumerate(rows):
        rates = error_rates(hypotheses[i], row.text)
        counts = rates.word_counts
        reasons = rule_rewards(hypotheses[i], row.text).hallucination_reasons
        excess = excess_repeats(hypotheses[i], row.text)
        hallucinations += bool(reasons)
        looping += "repeated_ngram" in reasons
        repeated += excess > 0
        totals["substitutions"] += counts.substitutions
        totals["deletions"] += counts.deletions
        totals["insertions"] += counts.insertions
        totals["words"] += counts.hits + counts.substitutions + counts.deletions
        records.append({"id": row.id, "reference": row.text, "hypothesis": hypotheses[i], "wer": round(rates.wer, 4),
                        "insertions": counts.insertions, "excess_repeats": excess, "hallucination": reasons})
    errors = totals["substitutions"] + totals["deletions"] + totals["insertions"]
    metrics = {"utterances": len(rows), "wer": errors / max(1, totals["words"]),
               "mean_utterance_wer": sum(float(r["wer"]) for r in records) / max(1, len(records)), **totals,
               "hallucinated_utterances": hallucinations, "repeated_ngram_utterances": looping,
               "repeating_utterances": repeated, "excess_repeats": sum(int(r["excess_repeats"]) for r in records)}
    return metrics, records


# -- the job -----------------------------------------------------------------------------------


def run_warmstart(config: WarmStartConfig) -> dict[str, Any]:
    """The whole warm start (module docstring); returns what warmstart.json holds."""
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    data, out = Path(config.data), Path(config.out)
    rows = read_manifest(data)
    train_names = [s.strip() for s in config.train_splits.split(",") if s.strip()]
    train_rows = [r for name in train_names for r in rows if r.split == name]
    if config.max_train_utterances:
        train_rows = train_rows[:config.max_train_utterances]
    if not train_rows:
        raise ValueError(f"{data} has none of the training splits {train_names}")
    eval_names = [s.strip() for s in config.eval_splits.split(",") if s.strip()]
    splits = {name: [r for r in rows if r.split == name] for name in eval_names}
    splits = {name: part for name, part in splits.items() if part}

    frontend_folder = Path(config.frontend) if config.frontend else default_ct2_frontend(config.hidden_size)
    frontend = load_ct2_encoder(frontend_folder, device=config.device, threads=config.threads)
    if frontend.output_size != config.hidden_size:
        raise ValueError(f"the front-end's output size {frontend.output_size} != hidden_size {config.hidden_size}")
    cache = data / "embeddings" / frontend_key(frontend_folder)
    started = time.monotonic()
    embeddings = embed_rows(frontend, train_rows, cache / "train.safetensors", config.encode_batch_size, "embed train")
    for name, part in splits.items():
        embeddings.update(embed_rows(frontend, part, cache / f"{name}.safetensors", config.encode_batch_size,
                                     f"embed {name}"))
    embed_seconds = time.monotonic() - started

    tokenizer = build_asr_tokenizer([r.text for r in train_rows], config.vocab_size)
    model: Any = build_asr_lm(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                              seed=config.seed)
    model = model.to(config.device)
    policy = AsrPolicy.create(tokenizer, model, embeddings_per_second=frontend.sample_rate / frontend.hop_length
                              / 2 / frontend.adaptor.config.downsample_rate)
    dev = (splits["dev"], embeddings) if "dev" in splits else None
    training = train(policy, train_rows, embeddings, config, dev)

    summary: dict[str, Any] = {"config": asdict(config), "train_utterances": len(train_rows),
                               "parameters": sum(p.numel() for p in model.parameters()),
                               "embed_seconds": round(embed_seconds, 1), "training": training, "eval": {}}
    (out / "hypotheses").mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        metrics, records = evaluate(policy, part, embeddings, config.eval_batch_size)
        summary["eval"][name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        (out / "hypotheses" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    policy.save(out, frontend=frontend_folder)
    (out / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m speechrl.trainer.recipes.warmstart [flags]`: run the warm start and print its table."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run_warmstart(parse_config(WarmStartConfig, "warmstart", argv, prog="python -m speechrl.trainer.recipes.warmstart",
                                         description="Supervised warm start of the small LLM-ASR."))
    training = summary["training"]
    print(f"trained {training['steps']} steps in {training['train_seconds']} s (loss {training['first_loss']:.3f} -> "
          f"{training['last_loss']:.3f}); embeddings {summary['embed_seconds']} s")
    print(f"{'split':>8} {'utts':>5} {'WER':>7} {'sub':>5} {'del':>5} {'ins':>5} {'R2 fires':>8} {'repeating':>9} "
          f"{'excess 4-grams':>14}")
    for name, m in summary["eval"].items():
        print(f"{name:>8} {m['utterances']:5d} {m['wer']:7.3f} {m['substitutions']:5d} {m['deletions']:5d} "
              f"{m['insertions']:5d} {m['hallucinated_utterances']:8d} {m['repeating_utterances']:9d} "
              f"{m['excess_repeats']:14d}")


if __name__ == "__main__":
    main()

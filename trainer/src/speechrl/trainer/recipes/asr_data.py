"""ASR data sets for RL: an espeak-ng English corpus, the paper's RL-data selectors, long segments.

The corpus (`build_asr_dataset`) is small enough for a CPU and learnable by a small LLM-ASR: the
sentences come from templates over a controlled vocabulary (names, numbers written as words,
places, objects, actions), a share of them "keyword-rich" with rare domain words, spoken by
several espeak-ng voices at 140-190 words per minute. train / dev / test hold disjoint sentences.
Everything is a function of the seed: the same seed gives the same manifest and the same WAV bytes.

On disk (DIR):

    manifest.jsonl     one Row per line: id, audio (relative to DIR), text, voice, rate, duration,
                       keywords, split, sources (the utterances a long segment joins)
    wav/<id>.wav       16 kHz mono 16-bit PCM (the encoder's rate, so every reader sees the same samples)

Splits: train, dev, test (single sentences, disjoint, cut tight as espeak-ng speaks them);
dev_recorded, test_recorded (the same dev and test utterances as a recording would hold them,
with 0.2..edge_silence_seconds of silence before and after: the slack a VAD segment keeps; an
LLM-ASR warm-started on tight audio invents words in that silence); rl_pool (utterances kept for
RL prompts, never trained on by the warm start, recorded like dev_recorded); joined (2-4 consecutive training
utterances, 6-14 s: the warm start learns to go on past a sentence end); long (test utterances
joined into 15-28 s segments with pauses of long_gap_seconds between them: long-form audio beyond
anything the warm start saw, where it invents words for the silences, loops and drops sentences);
long_train (the same from training utterances, RL prompts for the hallucination reward); long_repeat
(long training segments that say one of their sentences twice in a row: the long repeats among the
paper's hard cases, where an LLM-ASR drops the second saying or loops).

Selectors (functions over rows, after arXiv 2509.18569, section on RL data construction; in
jobs/selection.py) pick the RL prompts, and a job applies one at its start
(AsrJobConfig.prompt_selection); `build_long_segments` makes the hallucination-prone long inputs.

    python -m speechrl.trainer.recipes.asr_data --out runs/asr-data --train 1200 --dev 150 --test 150
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from speechrl.services.config import option, parse_config
from speechrl.services.espeak import EspeakSynthesizer
from speechrl.trainer.jobs.datasets import MANIFEST, Row, read_manifest, write_manifest
from speechrl.trainer.jobs.selection import select_max_duration

SAMPLE_RATE = 16_000
VOICES = "en-us,en-gb,en-gb-scotland,en-us+f3,en-us+m7,en-gb-x-rp+f2,en-029,en-us-nyc+m3"

# The controlled vocabulary. Numbers are words, as a transcript would spell them.
NAMES = ("alice bob carol david emma frank grace henry irene jack kate leo maria nick olivia peter rose sam "
         "tina victor").split()
NUMBERS = "two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty fifty".split()
PLACES = "kitchen garden station library market office harbor museum bakery school village bridge river farm".split()
OBJECTS = {"book": "books", "cup": "cups", "key": "keys", "letter": "letters", "box": "boxes", "chair": "chairs",
           "lamp": "lamps", "bottle": "bottles", "basket": "baskets", "ticket": "tickets", "map": "maps",
           "coat": "coats", "bag": "bags", "clock": "clocks", "candle": "candles"}
ADJECTIVES = "red blue green small large old new heavy bright wooden".split()
ACTIONS = "moved found opened painted carried cleaned dropped sold packed fixed".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
TIMES = [*DAYS, "noon", "midnight", "tonight", "lunch", "dinner"]
# Rare domain words: the keywords. A small model meets each one rarely, so it tends to miss them.
KEYWORDS = ("ibuprofen insulin amoxicillin tachycardia kubernetes latency firmware thermostat bandwidth router "
            "spectrometer telescope algorithm vaccine antibody protocol turbine satellite voltage catalyst").split()

TEMPLATES = (
    "{name} {action} the {adj} {obj} in the {place}",
    "{name} bought {number} {objs} at the {place} on {day}",
    "please bring the {adj} {obj} to {name} before {time}",
    "the {obj} near the {place} was {action} by {name}",
    "{name} and {name2} walked to the {place} at {number} o'clock",
    "there are {number} {adj} {objs} in the {place}",
    "did {name} leave the {obj} at the {place} on {day}",
    "{name} {action} {number} {objs} and a {adj} {obj}",
    "{name} {action} the {kw} in the {place}",
)
KEYWORD_TEMPLATES = (
    "{name} checked the {kw} and the {kw2} in the {place}",
    "the {kw} report mentions {kw2} and {kw3}",
    "{name} measured the {kw} of the {kw2} on {day}",
    "please order {number} units of {kw} and {kw2} for the {place}",
    "the {kw} in the {place} needs new {kw2} before {time}",
)


# -- sentences ---------------------------------------------------------------------------------


def generate_sentences(count: int, seed: int, keyword_rich_fraction: float = 0.2) -> list[tuple[str, tuple[str, ...]]]:
    """count distinct sentences with their keywords; keyword_rich_fraction of them from the keyword templates.

    >>> generate_sentences(2, seed=0) == generate_sentences(2, seed=0)
    True
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, tuple[str, ...]]] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"the templates cannot make {count} distinct sentences; ask for fewer")
        rich = rng.random() < keyword_rich_fraction
        sentence = _render(rng.choice(KEYWORD_TEMPLATES if rich else TEMPLATES), rng)
        if sentence[0] not in seen:
            seen.add(sentence[0])
            out.append(sentence)
    return out


def _render(template: str, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """Fill a template; the keywords are the domain words the sentence ended up with, in order."""
    name, name2 = rng.sample(NAMES, 2)
    kw, kw2, kw3 = rng.sample(KEYWORDS, 3)
    text = template.format(name=name, name2=name2, action=rng.choice(ACTIONS), adj=rng.choice(ADJECTIVES),
                           obj=rng.choice(sorted(OBJECTS)), objs=OBJECTS[rng.choice(sorted(OBJECTS))],
                           place=rng.choice(PLACES), number=rng.choice(NUMBERS), time=rng.choice(TIMES),
                           day=rng.choice(DAYS),
                           kw=kw, kw2=kw2, kw3=kw3)
    keywords = tuple(word for word in text.split() if word in KEYWORDS)
    return text, keywords


# -- the corpus --------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """An espeak-ng ASR corpus; every field is a flag of `python -m speechrl.trainer.recipes.asr_data`."""

    out: str = option("runs/asr-data", "Folder to write manifest.jsonl and wav/ into.")
    seed: int = option(0, "Seed of sentences, voices and rates: the same seed gives the same corpus.")
    train: int = option(1200, "Training utterances.")
    dev: int = option(150, "Development utterances (model selection).")
    test: int = option(150, "Test utterances (the reported WER).")
    voices: str = option(VOICES, "Comma-separated espeak-ng voices (voice+variant); each utterance draws one.")
    min_rate: int = option(140, "Slowest speaking rate, words per minute.")
    max_rate: int = option(190, "Fastest speaking rate, words per minute.")
    rl_pool: int = option(0, "Utterances kept for RL prompts (split rl_pool; sentences disjoint from the other "
                             "splits), as the paper draws its RL data from a pool of its own.")
    edge_silence_seconds: float = option(0.0, "With > 0: dev and test are also written as recorded (dev_recorded, "
                                              "test_recorded), and rl_pool is: each utterance gets 0.2..this many "
                                              "seconds of silence before and after it. train stays tight, as a "
                                              "forced-aligned SFT corpus is. 0: no recorded splits, rl_pool tight.")
    keyword_rich_fraction: float = option(0.2, "Share of sentences from the keyword-rich templates (2-3 rare words).")
    max_seconds: float = option(20.0, "Length cap of an utterance (the paper keeps RL audio under 20 s).")
    joined: int = option(300, "Multi-sentence training segments (joined_min..max seconds) from training utterances: "
                              "split 'joined', so the warm start learns to go on past a sentence end (0: none).")
    joined_min_seconds: float = option(6.0, "Shortest joined training segment.")
    joined_max_seconds: float = option(14.0, "Longest joined training segment (shorter than the long segments, "
                                             "which stay beyond what the warm start saw).")
    long_test: int = option(40, "Long segments joined from test utterances: split 'long' (0: none).")
    long_train: int = option(0, "Long segments joined from training utterances: split 'long_train' (0: none).")
    long_repeat: int = option(0, "Long segments of training utterances in which one sentence is said twice in a row: "
                                 "split 'long_repeat', the long repeats of the paper's hard cases (0: none).")
    long_min_seconds: float = option(15.0, "Shortest long segment.")
    long_max_seconds: float = option(28.0, "Longest long segment; under the encoder's 30 s window.")
    gap_seconds: float = option(0.3, "Silence between the utterances of a joined training segment.")
    long_gap_seconds: float = option(3.0, "Pause between the utterances of a long segment. Long-form audio has pauses, "
                                          "and an LLM-ASR trained on continuous speech fills them with invented words "
                                          "(insertions: the hallucination R2 penalises); with 0.3 s it only drops "
                                          "sentences.")
    workers: int = option(2, "espeak-ng processes at a time.")

    def __post_init__(self) -> None:
        if min(self.train, self.dev, self.test, self.rl_pool) < 0 or self.train + self.dev + self.test == 0:
            raise ValueError("train, dev, test and rl_pool must be >= 0, and train, dev and test not all 0")
        if not 0 <= self.edge_silence_seconds <= 5:
            raise ValueError(f"edge_silence_seconds must be in [0, 5] (0: none), got {self.edge_silence_seconds}")
        if not 80 <= self.min_rate <= self.max_rate <= 450:
            raise ValueError(f"rates must satisfy 80 <= min_rate <= max_rate <= 450, got {self.min_rate}-{self.max_rate}")
        for kind in ("long", "joined"):
            if not 0 < getattr(self, f"{kind}_min_seconds") <= getattr(self, f"{kind}_max_seconds") <= 30:
                raise ValueError(f"{kind} segments need 0 < {kind}_min_seconds <= {kind}_max_seconds <= 30 "
                                 "(the encoder window)")
        if min(self.gap_seconds, self.long_gap_seconds) < 0:
            raise ValueError(f"gap_seconds and long_gap_seconds must be >= 0, got {self.gap_seconds} and "
                             f"{self.long_gap_seconds}")
        if not self.voice_list:
            raise ValueError("voices must name at least one espeak-ng voice")

    @property
    def voice_list(self) -> list[str]:
        return [v.strip() for v in self.voices.split(",") if v.strip()]


def _write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, SAMPLE_RATE, subtype="PCM_16")


def _speak(synth: EspeakSynthesizer, text: str, voice: str, rate: int, out: Path) -> float:
    """espeak-ng -> 16 kHz 16-bit WAV at out; returns its duration in seconds."""
    samples, source_rate = soundfile.read(synth.path(text, voice=voice, rate=rate), dtype="float32")
    samples = soxr.resample(samples, source_rate, SAMPLE_RATE, quality="HQ")  # [N] float32
    _write_wav(out, samples)
    return int(soundfile.info(out).frames) / SAMPLE_RATE


def _plan(config: DataConfig) -> list[Row]:
    """The utterances to speak (duration still 0): sentences, splits, voices and rates from the seed."""
    sizes = {"train": config.train, "dev": config.dev, "test": config.test, "rl_pool": config.rl_pool}  # rl_pool
    # last: a seed's train, dev and test sentences, voices and rates do not depend on it
    sentences = generate_sentences(sum(sizes.values()), config.seed, config.keyword_rich_fraction)
    rng = random.Random(config.seed + 1)
    voices = config.voice_list
    rows, start = [], 0
    for split, size in sizes.items():
        for i, (text, keywords) in enumerate(sentences[start:start + size]):
            rows.append(Row(id=f"{split}-{i:05d}", audio=f"wav/{split}-{i:05d}.wav", text=text,
                            voice=rng.choice(voices), rate=rng.randint(config.min_rate, config.max_rate),
                            duration=0.0, keywords=keywords, split=split))
        start += size
    return rows


def build_asr_dataset(config: DataConfig, progress: bool = True) -> Path:
    """Speak the corpus, add the long splits, write manifest.jsonl; returns its path.

    Utterances over max_seconds are dropped (none are with the default templates and rates).
    """
    out = Path(config.out).resolve()
    planned = _plan(config)
    with tempfile.TemporaryDirectory(prefix="espeak-") as scratch, ThreadPoolExecutor(config.workers) as pool:
        synth = EspeakSynthesizer(Path(scratch))
        jobs = [pool.submit(_speak, synth, r.text, r.voice, r.rate, out / r.audio) for r in planned]
        bar = tqdm(jobs, desc="espeak-ng", unit="utt", disable=not progress)
        rows = [replace(r, audio=str(out / r.audio), duration=job.result()) for r, job in zip(planned, bar, strict=True)]
    rows = select_max_duration(rows, config.max_seconds)
    if config.edge_silence_seconds:
        rows = add_recorded_splits(rows, out, config.edge_silence_seconds, config.seed)
    joins = (("train", "joined", config.joined, config.joined_min_seconds, config.joined_max_seconds, config.gap_seconds),
             ("test", "long", config.long_test, config.long_min_seconds, config.long_max_seconds,
              config.long_gap_seconds),
             ("train", "long_train", config.long_train, config.long_min_seconds, config.long_max_seconds,
              config.long_gap_seconds))
    for source, split, count, shortest, longest, gap in joins:
        if count:
            rows += build_long_segments([r for r in rows if r.split == source], out, split=split, limit=count,
                                        min_seconds=shortest, max_seconds=longest, gap_seconds=gap, seed=config.seed)
    if config.long_repeat:
        rows += build_long_repeats(rows, out, config)
    return write_manifest(out / MANIFEST, rows)


def build_long_repeats(rows: Sequence[Row], out: Path, config: DataConfig) -> list[Row]:
    """config.long_repeat long segments (split long_repeat) of the training utterances among rows, each
    saying one of its sentences twice in a row (build_long_segments with repeat=True), sized and paused
    as the long segments are. Seeded apart from long_train (seed + 1), so they join other utterances."""
    return build_long_segments([r for r in rows if r.split == "train"], out, split="long_repeat",
                               limit=config.long_repeat, min_seconds=config.long_min_seconds,
                               max_seconds=config.long_max_seconds, gap_seconds=config.long_gap_seconds,
                               seed=config.seed + 1, repeat=True)


RECORDED_SPLITS = {"dev": "dev_recorded", "test": "test_recorded"}  # tight split -> its recorded copy


def add_recorded_splits(rows: Sequence[Row], out: Path, max_silence_seconds: float, seed: int) -> list[Row]:
    """rows with dev and test copied as recorded (RECORDED_SPLITS) and rl_pool replaced by its recorded form.

    A recorded utterance is the tight one with 0.2..max_silence_seconds of silence before and after
    (each drawn from the seed), written to wav/<split>-<n>.wav. Silence is digital zeros, as the pauses
    of the long segments are.
    """
    rng = random.Random(seed + 2)

    def recorded(row: Row, split: str) -> Row:
        samples, _ = soundfile.read(row.audio, dtype="float32")
        before, after = (np.zeros(round(rng.uniform(0.2, max_silence_seconds) * SAMPLE_RATE), np.float32)
                         for _ in range(2))
        audio = np.concatenate([before, samples, after])  # [N]
        name = row.id.replace(row.split, split, 1)
        path = out / "wav" / f"{name}.wav"
        _write_wav(path, audio)
        return replace(row, id=name, audio=str(path), split=split, duration=audio.shape[0] / SAMPLE_RATE)

    # In manifest order, so the silences drawn from the seed do not depend on how the rows are regrouped.
    made = {i: recorded(row, RECORDED_SPLITS.get(row.split, row.split)) for i, row in enumerate(rows)
            if row.split in RECORDED_SPLITS or row.split == "rl_pool"}
    kept = [made[i] if row.split == "rl_pool" else row for i, row in enumerate(rows)]
    return kept + [made[i] for i, row in enumerate(rows) if row.split in RECORDED_SPLITS]


# -- long segments -----------------------------------------------------------------------------


def _runs(rows: Sequence[Row], rng: random.Random, min_seconds: float, max_seconds: float,
          gap_seconds: float) -> Iterator[list[Row]]:
    """Consecutive rows of one voice, greedily joined until a random target in [min, max] seconds."""
    target = rng.uniform(min_seconds, max_seconds)
    run: list[Row] = []
    for row in rows:
        length = sum(r.duration for r in run) + gap_seconds * len(run)  # with the gap before row
        if run and length + row.duration > max_seconds:
            if length - gap_seconds >= min_seconds:
                yield run
            run, target = [], rng.uniform(min_seconds, max_seconds)
        if row.duration > max_seconds:
            continue
        run.append(row)
        if sum(r.duration for r in run) + gap_seconds * (len(run) - 1) >= target:
            yield run
            run, target = [], rng.uniform(min_seconds, max_seconds)


def _said_twice(run: list[Row], rng: random.Random, min_seconds: float, max_seconds: float,
                gap_seconds: float) -> list[Row] | None:
    """run with one of its utterances (drawn) said again right after itself, within max_seconds: its last
    utterances dropped as needed to make room; None when no such segment reaches min_seconds."""
    run = list(run)
    while run:
        length = sum(r.duration for r in run) + gap_seconds * (len(run) - 1)
        fits = [j for j, r in enumerate(run) if length + gap_seconds + r.duration <= max_seconds]
        if fits:
            j = rng.choice(fits)
            return run[:j + 1] + run[j:] if length + gap_seconds + run[j].duration >= min_seconds else None
        run.pop()
    return None


def build_long_segments(rows: Sequence[Row], out: str | Path, *, split: str = "long", min_seconds: float = 15.0,
                        max_seconds: float = 28.0, gap_seconds: float = 0.3, seed: int = 0,
                        limit: int | None = None, repeat: bool = False) -> list[Row]:
    """Join consecutive utterances of the same voice into long segments with their joined references.

    Why: an LLM-ASR warm-started on short utterances meets long inputs rarely, and there it
    loops, repeats or invents words: these are the hallucination-prone inputs on which the paper's
    hallucination reward (R2) is trained and measured. Each segment is min_seconds..max_seconds
    (under the encoder's 30 s window), its audio the sources with gap_seconds of silence between,
    its text the sources' texts joined by spaces, its duration their sum plus the gaps. Segments
    are ordered by their first source; the first `limit` are kept. WAVs go to out/wav/<id>.wav.

    repeat: each segment says one of its utterances twice in a row (its id twice in sources), the
    long repeats where an LLM-ASR drops the second saying or loops on it; runs that cannot take the
    repeat within max_seconds lose their last utterances, and are skipped below min_seconds.
    """
    out = Path(out).resolve()
    rng = random.Random(seed)
    position = {row.id: i for i, row in enumerate(rows)}
    by_voice: dict[str, list[Row]] = {}
    for row in rows:
        by_voice.setdefault(row.voice, []).append(row)
    runs = [run for voice in sorted(by_voice) for run in _runs(by_voice[voice], rng, min_seconds, max_seconds,
                                                                 gap_seconds)]
    runs.sort(key=lambda run: position[run[0].id])
    if repeat:  # drawn after the runs: the segments without repeat stay as they were
        runs = [twice for run in runs if (twice := _said_twice(run, rng, min_seconds, max_seconds, gap_seconds))]
    gap = np.zeros(round(gap_seconds * SAMPLE_RATE), dtype=np.float32)
    segments = []
    for i, run in enumerate(runs[:limit]):
        pieces: list[np.ndarray] = []
        for j, row in enumerate(run):
            samples, rate = soundfile.read(row.audio, dtype="float32")
            if rate != SAMPLE_RATE:
                samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
            pieces += [gap, samples] if j else [samples]
        audio = np.concatenate(pieces)  # [N] float32
        path = out / "wav" / f"{split}-{i:05d}.wav"
        _write_wav(path, audio)
        keywords = tuple(dict.fromkeys(k for row in run for k in row.keywords))
        segments.append(Row(id=f"{split}-{i:05d}", audio=str(path), text=" ".join(r.text for r in run),
                            voice=run[0].voice, rate=round(sum(r.rate for r in run) / len(run)),
                            duration=audio.shape[0] / SAMPLE_RATE, keywords=keywords, split=split,
                            sources=tuple(r.id for r in run)))
    return segments


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m speechrl.trainer.recipes.asr_data --out DIR [flags]`: build the corpus and print its splits."""
    config = parse_config(DataConfig, "data", argv, description=__doc__.split("\n")[0],
                          prog="python -m speechrl.trainer.recipes.asr_data")
    manifest = build_asr_dataset(config)
    rows = read_manifest(manifest)
    for split in dict.fromkeys(r.split for r in rows):
        part = [r for r in rows if r.split == split]
        print(f"{split:>13}: {len(part):5d} rows, {sum(r.duration for r in part) / 60:6.1f} min, "
              f"{max(r.duration for r in part):5.1f} s longest")
    print(f"manifest: {manifest}")


if __name__ == "__main__":
    main()

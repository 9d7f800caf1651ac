"""The prompt files a job reads: an ASR manifest (audio, transcript, keywords per row) and a TTS corpus
(texts per row). Recipes write them (recipes/asr_data.py, recipes/tts_warmstart.py); any other
source of prompts only has to write the same JSON lines.

    manifest.jsonl   one Row per line: id, audio (relative to the manifest's folder), text, voice, rate,
                     duration, keywords, split, sources
    corpus.jsonl     one object per line: text, tokens (the clean speech tokens), split
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
CORPUS = "corpus.jsonl"


def _splits(split: str | None) -> set[str] | None:
    """The split names of "train" or "train,long_train"; None: every split."""
    return None if split is None else {s.strip() for s in split.split(",")}


@dataclass(frozen=True)
class Row:
    """One manifest line: an utterance, or a long segment joining several (sources)."""

    id: str
    audio: str  # a WAV file: relative to the manifest's folder on disk, absolute once read
    text: str  # the reference transcript (lower case, no punctuation)
    voice: str  # espeak-ng voice, e.g. en-us+f3; a long segment joins one voice's utterances
    rate: int  # words per minute (a long segment: the mean of its sources)
    duration: float  # seconds
    keywords: tuple[str, ...] = ()  # the rare domain words in text, for the keyword reward (R3)
    split: str = "train"  # train, dev, test, or a long split
    sources: tuple[str, ...] = ()  # ids of the utterances a long segment joins

    def to_json(self, root: Path) -> str:
        values = asdict(self)
        audio = Path(self.audio)
        values["audio"] = str(audio.relative_to(root)) if audio.is_absolute() and audio.is_relative_to(root) else self.audio
        values["keywords"], values["sources"] = list(self.keywords), list(self.sources)
        return json.dumps(values)

    @classmethod
    def from_json(cls, line: str, root: Path) -> Row:
        values = json.loads(line)
        values["audio"] = str(root / values["audio"])
        values["keywords"], values["sources"] = tuple(values.get("keywords", ())), tuple(values.get("sources", ()))
        return cls(**values)


def write_manifest(path: str | Path, rows: Sequence[Row]) -> Path:
    """Write rows as JSONL; audio paths under the manifest's folder are stored relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    path.write_text("".join(row.to_json(root) + "\n" for row in rows))
    return path


def read_manifest(path: str | Path, split: str | None = None) -> list[Row]:
    """Rows of a manifest (file, or the folder holding manifest.jsonl), audio paths absolute; only the
    named split(s) when given ("train" or "train,long_train")."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    root = path.parent.resolve()
    rows = [Row.from_json(line, root) for line in path.read_text().splitlines() if line.strip()]
    wanted = _splits(split)
    return [r for r in rows if wanted is None or r.split in wanted]


def read_corpus(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of corpus.jsonl (a file or the folder holding it), only the named split(s) when given."""
    path = Path(path)
    path = path / CORPUS if path.is_dir() else path
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    wanted = _splits(split)
    return [r for r in rows if wanted is None or r["split"] in wanted]

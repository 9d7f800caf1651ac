"""The prompt speakers the token2wav_asr routes draw from, one per item, as CosyVoice2's GRPO recipe does.

The recipe's reward server renders every sampled token sequence with a prompt speaker drawn at
random from a speech corpus (aishell's test set), because CosyVoice2's flow-matching decoder needs
a speaker prompt and a policy should not learn one speaker's voice. Here the corpus is a folder of
audio files (`token2wav_prompts`); each is checked at start so that a bad file is named once, at
start, not as a failed item in the middle of a run.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import soundfile

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MIN_RATE_HERTZ = 16_000  # CosyVoice2's frontend takes its speaker embedding and prompt tokens at 16 kHz


@dataclass(frozen=True)
class PromptSpeaker:
    name: str
    """The file's name within the folder."""
    audio: bytes
    """The encoded file, sent as the item's prompt_audio."""


class PromptPool:
    """Audio files of prompt speakers, drawn uniformly with a seeded generator.

    >>> pool = PromptPool.from_folder("prompts/", seed=0)  # doctest: +SKIP
    >>> [p.name for p in pool.draw(3)]  # doctest: +SKIP
    ['BAC009S0764W0121.wav', 'BAC009S0765W0130.wav', 'BAC009S0764W0121.wav']
    """

    def __init__(self, speakers: list[PromptSpeaker], seed: int | None = None):
        if not speakers:
            raise ValueError("a prompt pool needs at least one prompt speaker")
        self.speakers = speakers
        self._random = random.Random(seed)

    @classmethod
    def from_folder(cls, folder: str | Path, seed: int | None = None) -> PromptPool:
        """Every .wav / .flac / .ogg file directly in folder. Raises ValueError naming what is wrong."""
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"token2wav_prompts: {root} is not a folder")
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"token2wav_prompts: {root} holds no {'/'.join(AUDIO_SUFFIXES)} files")
        speakers = []
        for path in files:
            try:
                info = soundfile.info(str(path))
            except (RuntimeError, soundfile.LibsndfileError) as exc:
                raise ValueError(f"token2wav_prompts: {path} is not audio soundfile can read: {exc}") from None
            if info.samplerate < MIN_RATE_HERTZ or info.frames == 0:
                raise ValueError(f"token2wav_prompts: {path} has {info.frames} samples at {info.samplerate} Hz; "
                                 f"a prompt speaker needs speech at >= {MIN_RATE_HERTZ} Hz")
            speakers.append(PromptSpeaker(path.name, path.read_bytes()))
        return cls(speakers, seed)

    def draw(self, count: int) -> list[PromptSpeaker]:
        """count prompt speakers, each drawn independently (the recipe draws one per item)."""
        return [self._random.choice(self.speakers) for _ in range(count)]

    def draw_audio(self, count: int) -> list[bytes]:
        """The audio of count drawn prompt speakers, for a token2wav hook; which ones is logged at DEBUG."""
        drawn = self.draw(count)
        log.debug("token2wav prompt speakers: %s", [p.name for p in drawn])
        return [p.audio for p in drawn]

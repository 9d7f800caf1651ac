"""Speaker-similarity engine: decodes audio, embeds a whole batch at once, scores by cosine.

Plain logic, no gRPC. The batcher hands `process` a mixed list of ScoreItem and EmbedItem (items
of concurrent ScoreSpeakerSimilarity, EmbedSpeaker and RegisterSpeaker calls), and every audio of
the batch — scored audio and reference audio alike — goes through the backend in one `embed`
call. Each item gets its own result or ItemFailure; a failure is never reported as a low score.

The score is the raw cosine of the two L2-normalised embeddings, in [-1, 1] (seed-tts-eval's
SIM); the reward is a named mapping of it (speechrl.rewards.similarity_reward).

>>> import numpy as np
>>> cosine(np.array([1.0, 0.0]), np.array([0.6, 0.8]))
0.6
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from speechrl.rewards import SIMILARITY_MAPPINGS, similarity_reward
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.errors import ErrorCode, ItemFailure, RequestInvalid
from speechrl.services.speaker.backends import SpeakerBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeakerRef:
    """A reference given by the name of a registered speaker."""

    speaker_id: str


@dataclass(frozen=True, eq=False)
class EmbeddingRef:
    """A reference given as an embedding the client holds (decoded, not yet validated)."""

    vector: np.ndarray


@dataclass(frozen=True)
class ScoreItem:
    """Compare the voice of `audio` with a reference; mapping None means the engine's default."""

    audio: AudioInput
    reference: AudioInput | EmbeddingRef | SpeakerRef
    mapping: str | None = None


@dataclass(frozen=True)
class EmbedItem:
    """Embed one audio (EmbedSpeaker, and each audio of RegisterSpeaker)."""

    audio: AudioInput


@dataclass(frozen=True)
class SimilarityScore:
    """Raw cosine in [-1, 1] and the reward under the named mapping."""

    cosine: float
    reward: float
    mapping: str


SpeakerWork = ScoreItem | EmbedItem
# EmbedItem -> float32 [D] unit vector; ScoreItem -> SimilarityScore.
SpeakerOutcome = SimilarityScore | np.ndarray


@dataclass
class _Plan:
    """Where one item's inputs sit: its audio's row of the batch, and its reference."""

    audio_row: int
    mapping: str | None = None  # None: an EmbedItem
    reference_row: int | None = None  # the reference audio's row, when it was audio
    reference_vector: np.ndarray | None = None  # the reference embedding, when given or registered

    def rows(self) -> list[int]:
        return [self.audio_row] + ([] if self.reference_row is None else [self.reference_row])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two unit vectors, clipped to [-1, 1] against rounding."""
    return float(np.clip(np.dot(a.astype(np.float64), b.astype(np.float64)), -1.0, 1.0))


class SpeakerRegistry:
    """Named speaker embeddings in memory, least recently used evicted beyond max_speakers.

    Shared by the event loop (RegisterSpeaker) and the model thread (lookups), hence the lock.
    """

    def __init__(self, max_speakers: int):
        self.max_speakers = max_speakers
        self._speakers: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, speaker_id: str, embedding: np.ndarray) -> None:
        """Store (or replace) a speaker, evicting the least recently used beyond the limit."""
        with self._lock:
            self._speakers[speaker_id] = embedding
            self._speakers.move_to_end(speaker_id)
            while len(self._speakers) > self.max_speakers:
                evicted, _ = self._speakers.popitem(last=False)
                log.info("speaker registry full (%d): evicted %r", self.max_speakers, evicted)

    def get(self, speaker_id: str) -> np.ndarray | None:
        """The stored embedding, or None when unknown (never registered, or evicted)."""
        with self._lock:
            embedding = self._speakers.get(speaker_id)
            if embedding is not None:
                self._speakers.move_to_end(speaker_id)
            return embedding

    def __len__(self) -> int:
        with self._lock:
            return len(self._speakers)


class SpeakerEngine:
    """Embeds and scores batches with one SpeakerBackend; keeps registered speakers."""

    def __init__(self, backend: SpeakerBackend, max_audio_seconds: float = 60.0,
                 default_mapping: str = "cosine", max_speakers: int = 10_000):
        if default_mapping not in SIMILARITY_MAPPINGS:
            raise ValueError(f"unknown reward mapping {default_mapping!r}; choose one of {sorted(SIMILARITY_MAPPINGS)}")
        self.backend = backend
        self.max_audio_seconds = max_audio_seconds
        self.default_mapping = default_mapping
        self.registry = SpeakerRegistry(max_speakers)

    @property
    def dim(self) -> int:
        """Embedding size D of the backend."""
        return self.backend.dim

    def warm_up_items(self) -> list[EmbedItem]:
        """Synthetic voiced audio of two lengths, for one batch through the server's real path at start.

        The first forward of a process allocates kernels and thread pools (and the first decode
        loads soxr); paying that before the port opens keeps it off the first request.
        """
        rate = self.backend.sample_rate
        t = np.arange(int(2.5 * rate)) / rate
        voiced = sum(np.sin(2 * np.pi * 120.0 * k * t) / k for k in range(1, 20))  # a buzz with harmonics
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)  # syllable-rate loudness changes
        wav = (0.1 * voiced * envelope).astype("<f4")
        return [EmbedItem(AudioInput(pcm=w.tobytes(), sample_rate_hertz=rate, pcm_encoding="PCM_F32LE"))
                for w in (wav, wav[: int(1.2 * rate)])]

    def process(self, items: list[SpeakerWork]) -> list[SpeakerOutcome | ItemFailure]:
        """One result per item, in order; all audio of the batch is embedded in one backend call.

        Audio that recurs in a batch is decoded and embedded once: a GRPO group's G samples are all
        compared with the same prompt speaker, so a batch of groups carries each reference G times.
        """
        waves: list[np.ndarray] = []  # every distinct decoded audio of the batch, in embedding order
        rows: dict[AudioInput, int] = {}  # audio -> its row of waves: the same audio is embedded once
        plans = [self._plan(item, waves, rows) for item in items]
        embeddings = self.backend.embed(waves) if waves else np.zeros((0, self.dim), np.float32)  # [W, D]
        # A backend must give unit rows; anything else (a dead ReLU, NaN) cannot be scored.
        usable = np.isfinite(embeddings).all(axis=1) & (np.abs(np.linalg.norm(embeddings, axis=1) - 1.0) < 1e-3)
        results: list[SpeakerOutcome | ItemFailure] = []
        for plan in plans:
            if isinstance(plan, ItemFailure):
                results.append(plan)
            elif not all(usable[r] for r in plan.rows()):
                results.append(ItemFailure(ErrorCode.INTERNAL, "the model gave a non-finite or zero embedding"))
            elif plan.mapping is None:
                results.append(embeddings[plan.audio_row].copy())
            else:
                reference = embeddings[plan.reference_row] if plan.reference_row is not None else plan.reference_vector
                assert reference is not None  # _plan sets a row or a vector for every ScoreItem
                cos = cosine(embeddings[plan.audio_row], reference)
                results.append(SimilarityScore(cos, similarity_reward(cos, plan.mapping), plan.mapping))
        return results

    def _plan(self, item: SpeakerWork, waves: list[np.ndarray], rows: dict[AudioInput, int]) -> _Plan | ItemFailure:
        """Check and decode one item, adding its audio to waves (once per distinct audio); cheap checks run first."""
        if isinstance(item, EmbedItem):
            row = self._row(item.audio, "", waves, rows)
            return row if isinstance(row, ItemFailure) else _Plan(row)
        mapping = item.mapping or self.default_mapping
        if mapping not in SIMILARITY_MAPPINGS:
            raise ValueError(f"unknown reward mapping {mapping!r}; choose one of {sorted(SIMILARITY_MAPPINGS)}")
        vector: np.ndarray | ItemFailure | None = None
        if isinstance(item.reference, SpeakerRef):
            vector = self._lookup(item.reference.speaker_id)
        elif isinstance(item.reference, EmbeddingRef):
            vector = self.check_embedding(item.reference.vector, "reference_embedding")
        if isinstance(vector, ItemFailure):
            return vector
        audio_row = self._row(item.audio, "audio", waves, rows)
        if isinstance(audio_row, ItemFailure):
            return audio_row
        reference_row = None
        if isinstance(item.reference, AudioInput):
            row = self._row(item.reference, "reference_audio", waves, rows)
            if isinstance(row, ItemFailure):
                return row
            reference_row = row
        return _Plan(audio_row, mapping, reference_row, vector)

    def _row(self, audio: AudioInput, field: str, waves: list[np.ndarray], rows: dict[AudioInput, int]) -> int | ItemFailure:
        """The row of waves holding audio, decoding and appending it the first time the batch meets it."""
        if audio in rows:
            return rows[audio]
        wav = self._decode(audio, field)
        if isinstance(wav, ItemFailure):
            return wav
        waves.append(wav)
        rows[audio] = len(waves) - 1
        return rows[audio]

    def _decode(self, audio: AudioInput, field: str) -> np.ndarray | ItemFailure:
        """Mono float32 at the backend's rate, or the reason it cannot be embedded."""
        try:
            wav = decode_audio(audio, self.backend.sample_rate, self.max_audio_seconds)
        except ItemFailure as failure:
            return failure.at(field) if field else failure
        if not np.any(wav):
            # Digital silence has no voice to embed (and an infinite gain to normalise).
            return ItemFailure(ErrorCode.EMPTY_AUDIO, "audio is silent (every sample is zero)", field)
        seconds = len(wav) / self.backend.sample_rate
        if seconds < self.backend.min_seconds:
            return ItemFailure(ErrorCode.INVALID_AUDIO, f"audio is {seconds:.3f} s, shorter than the "
                               f"{self.backend.min_seconds:.3f} s the {self.backend.name} backend needs", field)
        return wav

    def _lookup(self, speaker_id: str) -> np.ndarray | ItemFailure:
        embedding = self.registry.get(speaker_id)
        if embedding is None:
            return ItemFailure(ErrorCode.UNKNOWN_SPEAKER, f"no registered speaker {speaker_id!r} (register it with "
                               f"RegisterSpeaker; this server keeps the {self.registry.max_speakers} most recently used)",
                               "speaker_id")
        return embedding

    def check_embedding(self, vector: np.ndarray, field: str) -> np.ndarray | ItemFailure:
        """A client-given embedding as a float32 unit [D] vector, or INVALID_TENSOR saying what is wrong."""
        def bad(message: str) -> ItemFailure:
            return ItemFailure(ErrorCode.INVALID_TENSOR, message, field)

        if not np.issubdtype(vector.dtype, np.floating):
            return bad(f"dtype must be a float type (float32 as EmbedSpeaker returns), got {vector.dtype}")
        if vector.ndim == 2 and vector.shape[0] == 1:
            vector = vector[0]  # a batch of one, [1, D], is accepted too
        if vector.shape != (self.dim,):
            return bad(f"shape must be [{self.dim}] for the {self.backend.name} backend, got {list(vector.shape)}")
        values = vector.astype(np.float64)
        if not np.isfinite(values).all():
            return bad("embedding has NaN or infinite values")
        norm = float(np.linalg.norm(values))
        if norm < 1e-12:
            return bad("embedding has zero norm")
        return (values / norm).astype(np.float32)

    def register(self, speaker_id: str, embeddings: list[np.ndarray]) -> np.ndarray:
        """Store the L2-normalised mean of a speaker's embeddings under speaker_id; returns it."""
        mean = np.mean(np.stack(embeddings).astype(np.float64), axis=0)  # [D]
        norm = float(np.linalg.norm(mean))
        if norm < 1e-6:
            raise RequestInvalid("audios", "their embeddings cancel out (the mean is zero); register other audio")
        stored = (mean / norm).astype(np.float32)
        self.registry.put(speaker_id, stored)
        return stored

"""Plain result types of the clients, one per request item, built from the API's replies.

Every per-item result holds either its score (or embedding, samples...) or an `ItemError`, never
both, mirroring the proto `oneof outcome`: a failed item never looks like a real low score.
`result.ok` tells which; `result.reward` is None for a failed item, which is the trainer reward
contract's "could not score".

Enum values are names without their proto prefix: error codes upper case as the servers'
`ErrorCode` ("EMPTY_TEXT"), reward mappings lower case as in `speechrl.rewards`
("one_minus_wer", "cosine"), finish reasons lower case as in vLLM ("stop", "length").

>>> from speechrl.v1 import common_pb2, rule_rewards_pb2
>>> reply = rule_rewards_pb2.RuleRewardResult(error=common_pb2.ItemError(
...     code=common_pb2.ITEM_ERROR_CODE_EMPTY_TEXT, message="reference is empty", field="items[0].reference"))
>>> result = rule_result(reply)
>>> result.ok, result.reward, result.error.code
(False, None, 'EMPTY_TEXT')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from speechrl.client.codec import tensor_to_numpy
from speechrl.v1 import (
    common_pb2,
    encoder_pb2,
    intelligibility_pb2,
    rollout_pb2,
    rule_rewards_pb2,
    speaker_pb2,
    token2wav_pb2,
)


def enum_name(enum: Any, value: int, prefix: str, lower: bool = True) -> str:
    """The name of a proto enum value without its prefix, e.g. 1 -> "one_minus_wer"."""
    name = enum.Name(value) if value in enum.values() else str(value)
    name = name.removeprefix(prefix)
    return name.lower() if lower else name


def enum_value(enum: Any, name: str | int | None, prefix: str) -> Any:
    """The number of an enum value given as "one_minus_wer", "ONE_MINUS_WER", the full name or a number.

    Typed Any because the proto stubs give every enum its own int subtype.

    >>> enum_value(intelligibility_pb2.WerRewardMapping, "one_minus_tanh_3wer", "WER_REWARD_MAPPING_")
    2
    """
    if name is None:
        return 0
    if isinstance(name, int):
        return name
    full = name.upper() if name.upper().startswith(prefix) else prefix + name.upper()
    if full not in enum.keys():
        choices = [k.removeprefix(prefix).lower() for k in enum.keys() if not k.endswith("UNSPECIFIED")]
        raise ValueError(f"unknown value {name!r}; choose one of {choices}")
    return int(enum.Value(full))


class ItemFailedError(RuntimeError):
    """Raised by `unwrap()` on a result that holds an ItemError."""


@dataclass(frozen=True)
class ItemError:
    """Why one item could not be processed; its neighbours are unaffected."""

    code: str
    """The kind of failure, e.g. "EMPTY_TEXT", "INVALID_AUDIO" (ItemErrorCode without its prefix)."""
    message: str
    """A human-readable reason, e.g. "reference is empty"."""
    field: str
    """The request field at fault, e.g. "items[3].reference"; empty when not one field."""

    @classmethod
    def from_proto(cls, error: common_pb2.ItemError) -> ItemError:
        return cls(enum_name(common_pb2.ItemErrorCode, error.code, "ITEM_ERROR_CODE_", lower=False),
                   error.message, error.field)


@dataclass(frozen=True)
class ErrorCounts:
    """Alignment counts from jiwer."""

    hits: int
    substitutions: int
    insertions: int
    deletions: int

    @classmethod
    def from_proto(cls, counts: common_pb2.ErrorCounts) -> ErrorCounts:
        return cls(counts.hits, counts.substitutions, counts.insertions, counts.deletions)


V = TypeVar("V")


class _Outcome(Generic[V]):
    """What every per-item result shares: `ok`, and `unwrap()` for callers who prefer exceptions."""

    error: ItemError | None

    @property
    def ok(self) -> bool:
        """True when the item was processed."""
        return self.error is None

    def _value(self) -> V:
        raise NotImplementedError

    def unwrap(self) -> V:
        """The item's value; raises ItemFailedError with the item's error when it failed."""
        if self.error is not None:
            raise ItemFailedError(f"{self.error.code}: {self.error.message}"
                                  + (f" ({self.error.field})" if self.error.field else ""))
        return self._value()


@dataclass(frozen=True)
class IntelligibilityScore:
    """Transcript and error rates of one utterance (see speechrl.v1.IntelligibilityScore)."""

    transcript: str
    normalized_transcript: str
    normalized_reference: str
    wer: float
    """Word error rate on normalised words; >= 0, may exceed 1."""
    cer: float
    word_counts: ErrorCounts
    char_counts: ErrorCounts
    reward: float
    reward_mapping: str
    """The mapping that produced reward, e.g. "one_minus_wer"."""
    audio_duration_seconds: float
    error_rate: float
    """The error rate reward came from, in error_unit: wer, cer or the pinyin syllable WER."""
    error_unit: str
    """"word", "character" or "pinyin"."""


@dataclass(frozen=True)
class IntelligibilityResult(_Outcome[IntelligibilityScore]):
    """One item's IntelligibilityScore, or its error."""

    score: IntelligibilityScore | None = None
    error: ItemError | None = None

    @property
    def reward(self) -> float | None:
        return None if self.score is None else self.score.reward

    def _value(self) -> IntelligibilityScore:
        return self.score  # type: ignore[return-value]


def intelligibility_result(result: intelligibility_pb2.IntelligibilityResult) -> IntelligibilityResult:
    if result.HasField("error"):
        return IntelligibilityResult(error=ItemError.from_proto(result.error))
    s = result.score
    return IntelligibilityResult(score=IntelligibilityScore(
        transcript=s.transcript, normalized_transcript=s.normalized_transcript,
        normalized_reference=s.normalized_reference, wer=s.wer, cer=s.cer,
        word_counts=ErrorCounts.from_proto(s.word_counts), char_counts=ErrorCounts.from_proto(s.char_counts),
        reward=s.reward, reward_mapping=enum_name(intelligibility_pb2.WerRewardMapping, s.reward_mapping, "WER_REWARD_MAPPING_"),
        audio_duration_seconds=s.audio_duration_seconds, error_rate=s.error_rate,
        error_unit=enum_name(intelligibility_pb2.ErrorUnit, s.error_unit, "ERROR_UNIT_")))


@dataclass(frozen=True)
class SpeakerScore:
    """Similarity of one audio to its reference voice."""

    cosine: float
    """Raw cosine similarity of the two embeddings, in [-1, 1] (seed-tts-eval's SIM)."""
    reward: float
    reward_mapping: str
    """The mapping that produced reward: "cosine", "shifted" or "clipped"."""


@dataclass(frozen=True)
class SpeakerResult(_Outcome[SpeakerScore]):
    """One comparison's SpeakerScore, or its error."""

    score: SpeakerScore | None = None
    error: ItemError | None = None

    @property
    def reward(self) -> float | None:
        return None if self.score is None else self.score.reward

    def _value(self) -> SpeakerScore:
        return self.score  # type: ignore[return-value]


def speaker_result(result: speaker_pb2.SpeakerSimilarityResult) -> SpeakerResult:
    if result.HasField("error"):
        return SpeakerResult(error=ItemError.from_proto(result.error))
    s = result.score
    return SpeakerResult(score=SpeakerScore(
        s.cosine, s.reward, enum_name(speaker_pb2.SimilarityRewardMapping, s.reward_mapping, "SIMILARITY_REWARD_MAPPING_")))


@dataclass(frozen=True)
class EmbeddingResult(_Outcome[np.ndarray]):
    """One audio's speaker embedding (float32 [D], L2-normalised), or its error."""

    embedding: np.ndarray | None = None
    error: ItemError | None = None

    def _value(self) -> np.ndarray:
        return self.embedding  # type: ignore[return-value]


def embedding_result(result: speaker_pb2.EmbedSpeakerResult) -> EmbeddingResult:
    if result.HasField("error"):
        return EmbeddingResult(error=ItemError.from_proto(result.error))
    return EmbeddingResult(embedding=tensor_to_numpy(result.embedding))


@dataclass(frozen=True)
class RegisteredSpeaker:
    """A speaker the server now knows by name."""

    speaker_id: str
    embedding: np.ndarray
    """The stored embedding, float32 [D], L2-normalised."""


@dataclass(frozen=True)
class RuleScore:
    """Every rule-reward component of one hypothesis (arXiv 2509.18569's R1, R2, R3)."""

    wer: float
    word_counts: ErrorCounts
    accuracy_reward: float
    """R1 = clip(1 - wer, 0, 1)."""
    hallucination_reward: float
    """R2 = -1 when a hallucination rule fired, else 0."""
    hallucination_reasons: tuple[str, ...]
    keyword_precision: float
    keyword_recall: float
    keyword_reward: float
    """R3 = (keyword_precision + keyword_recall) / 2."""
    total: float
    """w1 * R1 + w2 * R2 + w3 * R3 under the request's weights."""


@dataclass(frozen=True)
class RuleResult(_Outcome[RuleScore]):
    """One hypothesis's RuleScore, or its error."""

    score: RuleScore | None = None
    error: ItemError | None = None

    @property
    def reward(self) -> float | None:
        """The weighted total, or None when the item failed."""
        return None if self.score is None else self.score.total

    def _value(self) -> RuleScore:
        return self.score  # type: ignore[return-value]


def rule_result(result: rule_rewards_pb2.RuleRewardResult) -> RuleResult:
    if result.HasField("error"):
        return RuleResult(error=ItemError.from_proto(result.error))
    s = result.score
    return RuleResult(score=RuleScore(
        wer=s.wer, word_counts=ErrorCounts.from_proto(s.word_counts), accuracy_reward=s.accuracy_reward,
        hallucination_reward=s.hallucination_reward, hallucination_reasons=tuple(s.hallucination_reasons),
        keyword_precision=s.keyword_precision, keyword_recall=s.keyword_recall, keyword_reward=s.keyword_reward,
        total=s.total))


@dataclass(frozen=True)
class EncodedAudio(_Outcome[np.ndarray]):
    """One audio's encoder embeddings, [T, D] in the LLM's input space, or its error."""

    embeddings: np.ndarray | None = None
    length: int = 0
    """T, the number of valid frames."""
    error: ItemError | None = None

    def _value(self) -> np.ndarray:
        return self.embeddings  # type: ignore[return-value]


def encoded_audio(response: encoder_pb2.EncodeAudioResponse) -> EncodedAudio:
    if response.HasField("error"):
        return EncodedAudio(error=ItemError.from_proto(response.error))
    return EncodedAudio(embeddings=tensor_to_numpy(response.embeddings), length=response.length)


@dataclass(frozen=True)
class SynthesizedSpeech(_Outcome[bytes]):
    """One token sequence rendered as a mono 16-bit PCM WAV file, or its error."""

    wav: bytes | None = None
    sample_rate_hertz: int = 0
    duration_seconds: float = 0.0
    error: ItemError | None = None

    def _value(self) -> bytes:
        return self.wav  # type: ignore[return-value]


def synthesized_speech(result: token2wav_pb2.SynthesisResult) -> SynthesizedSpeech:
    if result.HasField("error"):
        return SynthesizedSpeech(error=ItemError.from_proto(result.error))
    audio = result.audio
    return SynthesizedSpeech(wav=audio.wav, sample_rate_hertz=audio.sample_rate_hertz,
                             duration_seconds=audio.duration_seconds)


@dataclass(frozen=True)
class TokenScore:
    """How well one speech-token sequence says its text under the server's Token2Reward (no audio involved)."""

    log_prob: float
    """log P(text | tokens) in nats, <= 0; -1e4 (the model's penalty) when not alignable."""
    num_chars: int
    """Characters of the text the model scores."""
    alignable: bool
    """False when the tokens are too few to spell the text."""
    reward: float
    """exp(log_prob / num_chars): geometric-mean per-character probability in [0, 1]; 0 when not alignable."""


@dataclass(frozen=True)
class TokenScoreResult(_Outcome[TokenScore]):
    """One pair's TokenScore, or its error."""

    score: TokenScore | None = None
    error: ItemError | None = None

    @property
    def reward(self) -> float | None:
        return None if self.score is None else self.score.reward

    def _value(self) -> TokenScore:
        return self.score  # type: ignore[return-value]


def token_score_result(result: token2wav_pb2.TokenScoreResult) -> TokenScoreResult:
    if result.HasField("error"):
        return TokenScoreResult(error=ItemError.from_proto(result.error))
    s = result.score
    return TokenScoreResult(score=TokenScore(s.log_prob, s.num_chars, s.alignable, s.reward))


@dataclass(frozen=True)
class Sample:
    """One sampled completion."""

    prompt_index: int
    token_ids: tuple[int, ...]
    text: str
    """Detokenised text; empty for speech tokens."""
    logprobs: np.ndarray
    """float32 [len(token_ids)]: log-probability of each token under the sampling policy."""
    finish_reason: str
    """"stop" (end of sequence or a stop string) or "length" (max_tokens reached)."""
    policy_version: int


@dataclass(frozen=True)
class PromptResult(_Outcome[list[Sample]]):
    """The n samples of one prompt, or its error."""

    samples: list[Sample] = field(default_factory=list)
    error: ItemError | None = None

    def _value(self) -> list[Sample]:
        return self.samples


def prompt_result(result: rollout_pb2.PromptResult) -> PromptResult:
    if result.HasField("error"):
        return PromptResult(error=ItemError.from_proto(result.error))
    return PromptResult(samples=[
        Sample(prompt_index=s.prompt_index, token_ids=tuple(s.token_ids), text=s.text,
               logprobs=tensor_to_numpy(s.logprobs) if s.HasField("logprobs") else np.zeros(0, np.float32),
               finish_reason=enum_name(rollout_pb2.FinishReason, s.finish_reason, "FINISH_REASON_"),
               policy_version=s.policy_version)
        for s in result.samples])


@dataclass(frozen=True)
class DeviceMemory:
    """What a process holds on one device (its entry of the device-memory ledger)."""

    device: str
    residency: str
    """Where its weights are: "resident", "offloaded" or "asleep"."""
    weight_bytes: int
    """Bytes of weights and buffers it holds on the device now (0 when offloaded)."""
    allocated_bytes: int
    """torch.cuda.memory_allocated of the device at the report; -1 when not known (not CUDA)."""
    reserved_bytes: int
    """torch.cuda.memory_reserved of the device at the report; -1 when not known."""
    updated_unix_ms: int

    @classmethod
    def from_proto(cls, m: common_pb2.DeviceMemory) -> DeviceMemory:
        return cls(device=m.device, residency=m.residency, weight_bytes=m.weight_bytes,
                   allocated_bytes=m.allocated_bytes, reserved_bytes=m.reserved_bytes,
                   updated_unix_ms=m.updated_unix_ms)


@dataclass(frozen=True)
class ServiceStatus:
    """What a server runs (GetServiceStatus)."""

    service: str
    backend: str
    model: str
    device: str
    residency: str
    """Where the model lives now: "resident", "offloaded" or "asleep"."""
    lease_device: str
    lease_held: bool
    fencing_token: int
    max_batch_size: int
    max_wait_ms: int
    items_processed: int
    items_failed: int
    version: str
    policy_version: int = 0
    """The policy version a rollout generator samples with; 0 for other services."""
    device_memory: tuple[DeviceMemory, ...] = ()
    """What the server holds on each device it leases; empty without a lease."""

    @classmethod
    def from_proto(cls, s: common_pb2.GetServiceStatusResponse) -> ServiceStatus:
        return cls(service=s.service, backend=s.backend, model=s.model, device=s.device, residency=s.residency,
                   lease_device=s.lease.device, lease_held=s.lease.held, fencing_token=s.lease.fencing_token,
                   max_batch_size=s.batching.max_batch_size, max_wait_ms=s.batching.max_wait_ms,
                   items_processed=s.items_processed, items_failed=s.items_failed, version=s.version,
                   policy_version=s.policy_version,
                   device_memory=tuple(DeviceMemory.from_proto(m) for m in s.device_memory))

"""Asyncio clients of every SpeechRL service; the sync clients in `speechrl.client.sync` wrap these.

Each method takes plain Python values (audio as a path, bytes, a (samples, rate) pair or an Audio
message), sends one batch request, and returns one result per item in request order. An item the
server could not process comes back with `.error` set; only a failure of the whole call raises
`ServiceError`.

>>> import asyncio
>>> async def main():  # doctest: +SKIP
...     async with AsyncRuleRewardsClient("127.0.0.1:50053") as rules:
...         await rules.wait_until_ready(timeout_s=10)
...         results = await rules.score(["the cat sat"], ["the cat sat on the mat"])
...         return results[0].score.wer
>>> asyncio.run(main())  # doctest: +SKIP
0.5
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, Unpack

import grpc
import numpy as np

from speechrl.client._channel import (
    CALLER_DEADLINE,
    REQUEST_ID,
    ClientOptions,
    Connection,
    Endpoints,
    ServiceError,
)
from speechrl.client.coalescing import Coalescer
from speechrl.client.codec import AudioLike, numpy_to_tensor, tensor_to_numpy, to_audio
from speechrl.client.models import (
    EmbeddingResult,
    EncodedAudio,
    IntelligibilityResult,
    PromptResult,
    RegisteredSpeaker,
    RuleResult,
    ServiceStatus,
    SpeakerResult,
    SynthesizedSpeech,
    TokenScoreResult,
    embedding_result,
    encoded_audio,
    enum_value,
    intelligibility_result,
    prompt_result,
    rule_result,
    speaker_result,
    synthesized_speech,
    token_score_result,
)
from speechrl.client.ports import DEFAULT_PORTS
from speechrl.client.speaker_request import SpeakerReference, is_one_reference, score_request
from speechrl.v1 import (
    common_pb2,
    common_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    intelligibility_pb2,
    intelligibility_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    rule_rewards_pb2,
    rule_rewards_pb2_grpc,
    speaker_pb2,
    speaker_pb2_grpc,
    token2wav_pb2,
    token2wav_pb2_grpc,
)

# Default ports of the local stack; the same numbers as speechrl.services.ports, repeated here
# because the light client must not depend on the services distribution.


# A prompt: text, token ids, or [T, D] embeddings (e.g. from the audio encoder), or a ready message.
PromptLike = str | Sequence[int] | np.ndarray | rollout_pb2.Prompt


def _per_item(value: Any, count: int, name: str) -> list[Any]:
    """A per-item list from one value for all items or a sequence of one per item."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries for {count} items; give one per item or one for all")
    return list(value)


def _same_length(**sequences: Sequence[Any]) -> int:
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"need one entry per item, got lengths {lengths}")
    return next(iter(lengths.values()))


def _check_count(results: Sequence[Any], expected: int, method: str) -> None:
    # A reply with the wrong number of results cannot be matched to items; never guess.
    if len(results) != expected:
        raise ServiceError(grpc.StatusCode.INTERNAL, f"{method} answered {len(results)} results for {expected} items")


class AsyncClient:
    """What every client shares: endpoints, readiness, status and closing.

    Args:
        endpoints: "host:port", a comma-separated list or a sequence; the service's local port by default.
        **options: timeout_s (default 30 s per call, retries included), retry (RetryPolicy),
            token (bearer token), metadata, max_message_mb, seed; see `Connection`.
    """

    SERVICE: ClassVar[str] = ""
    """Full gRPC name of the service, as health checks know it."""
    DEFAULT_ENDPOINT: ClassVar[str] = ""

    def __init__(self, endpoints: Endpoints | None = None, **options: Unpack[ClientOptions]):
        self.connection = Connection(endpoints or self.DEFAULT_ENDPOINT, **options)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.connection.endpoints

    async def wait_until_ready(self, timeout_s: float = 30.0, *, all_endpoints: bool = False) -> dict[str, str]:
        """Wait until an endpoint (or every one) reports SERVING on grpc.health.v1.

        Returns the state of every endpoint; raises ServiceError(UNAVAILABLE) after timeout_s.
        """
        return await self.connection.wait_until_ready(self.SERVICE, timeout_s, all_endpoints)

    async def health(self, timeout_s: float = 1.0) -> dict[str, str]:
        """The grpc.health.v1 state of this service at every endpoint, e.g. {"h:50053": "SERVING"}."""
        return await self.connection.health(self.SERVICE, timeout_s)

    async def get_service_status(self, timeout_s: float | None = None) -> ServiceStatus:
        """What the server runs: backend, model, device, batching and item counters."""
        reply = await self.connection.unary(common_pb2_grpc.ServiceStatusStub, "GetServiceStatus",
                                            common_pb2.GetServiceStatusRequest(), timeout_s)
        return ServiceStatus.from_proto(reply)

    async def close(self) -> None:
        """Close the channels."""
        await self.connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncIntelligibilityClient(AsyncClient):
    """Client of the intelligibility scorer: transcript, WER/CER and a reward per utterance."""

    SERVICE = "speechrl.v1.IntelligibilityScorer"
    DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_PORTS['intelligibility']}"

    async def score(self, audios: Sequence[AudioLike], references: Sequence[str], *,
                    language: str | Sequence[str] = "", reward_mapping: str | None = None,
                    error_unit: str | None = None, timeout_s: float | None = None) -> list[IntelligibilityResult]:
        """Transcribe each audio and score it against its reference text.

        Args:
            audios: one audio per item.
            references: what each audio should say.
            language: ISO 639-1 code for all items or one per item; "" is the server default ("en").
            reward_mapping: "one_minus_wer", "one_minus_tanh_3wer" or "negative_wer"; None is the server's.
            error_unit: what the rewarded error rate counts: "word" (None), "character", or "pinyin"
                (Mandarin syllables with tones, CosyVoice2's GRPO recipe's metric).
        """
        count = _same_length(audios=audios, references=references)
        languages = _per_item(language, count, "language")
        request = intelligibility_pb2.ScoreIntelligibilityRequest(
            items=[intelligibility_pb2.IntelligibilityItem(audio=to_audio(a), reference_text=r, language=lang)
                   for a, r, lang in zip(audios, references, languages, strict=True)],
            reward_mapping=enum_value(intelligibility_pb2.WerRewardMapping, reward_mapping, "WER_REWARD_MAPPING_"),
            error_unit=enum_value(intelligibility_pb2.ErrorUnit, error_unit, "ERROR_UNIT_"))
        reply = await self.connection.unary(intelligibility_pb2_grpc.IntelligibilityScorerStub,
                                            "ScoreIntelligibility", request, timeout_s)
        _check_count(reply.results, count, "ScoreIntelligibility")
        return [intelligibility_result(r) for r in reply.results]


class AsyncSpeakerClient(AsyncClient):
    """Client of the speaker-similarity scorer: score, embed, register."""

    SERVICE = "speechrl.v1.SpeakerSimilarityScorer"
    DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_PORTS['speaker']}"

    async def score(self, audios: Sequence[AudioLike], references: SpeakerReference | Sequence[SpeakerReference], *,
                    reward_mapping: str | None = None, timeout_s: float | None = None) -> list[SpeakerResult]:
        """Compare the voice of each audio with its reference voice.

        Args:
            audios: the speech whose voice is judged, one per item.
            references: one reference for all items or one per item: audio, an embedding from
                `embed` (1-D ndarray), or `SpeakerId(name)` of a registered speaker. A reference
                audio that several items share (the same object, path or bytes) is sent once.
            reward_mapping: "cosine", "shifted" or "clipped"; None is the server's default.
        """
        refs = ([references] * len(audios) if is_one_reference(references)
                else _per_item(references, len(audios), "references"))
        request = score_request(audios, refs, reward_mapping)
        reply = await self.connection.unary(speaker_pb2_grpc.SpeakerSimilarityScorerStub,
                                            "ScoreSpeakerSimilarity", request, timeout_s)
        _check_count(reply.results, len(audios), "ScoreSpeakerSimilarity")
        return [speaker_result(r) for r in reply.results]

    async def embed(self, audios: Sequence[AudioLike], *, timeout_s: float | None = None) -> list[EmbeddingResult]:
        """The speaker embedding of each audio (float32 [D], L2-normalised)."""
        request = speaker_pb2.EmbedSpeakerRequest(audios=[to_audio(a) for a in audios])
        reply = await self.connection.unary(speaker_pb2_grpc.SpeakerSimilarityScorerStub, "EmbedSpeaker",
                                            request, timeout_s)
        _check_count(reply.results, len(audios), "EmbedSpeaker")
        return [embedding_result(r) for r in reply.results]

    async def register(self, speaker_id: str, audios: Sequence[AudioLike], *,
                       timeout_s: float | None = None) -> RegisteredSpeaker:
        """Store a speaker under a name (the mean embedding of its audios); re-registering replaces it.

        With several endpoints, each replica keeps its own registry: register on every endpoint
        (one client per endpoint) or pass embeddings instead of names.
        """
        request = speaker_pb2.RegisterSpeakerRequest(speaker_id=speaker_id, audios=[to_audio(a) for a in audios])
        reply = await self.connection.unary(speaker_pb2_grpc.SpeakerSimilarityScorerStub, "RegisterSpeaker",
                                            request, timeout_s)
        return RegisteredSpeaker(reply.speaker_id, tensor_to_numpy(reply.embedding))


@dataclass(frozen=True)
class _RulesKey:
    """Everything a ScoreRules call holds besides its items, and the context values it sends:
    calls that agree on all of it can share one request."""

    accuracy_weight: float | None
    hallucination_weight: float | None
    keyword_weight: float | None
    accuracy_mapping: str | None
    accuracy_floor: float | None
    timeout_s: float | None
    request_id: str | None
    caller_deadline: float | None

    def request(self, items: Sequence[rule_rewards_pb2.RuleRewardItem]) -> rule_rewards_pb2.ScoreRulesRequest:
        request = rule_rewards_pb2.ScoreRulesRequest(
            items=items, weights=self.weights(),
            accuracy_mapping=enum_value(intelligibility_pb2.WerRewardMapping, self.accuracy_mapping, "WER_REWARD_MAPPING_"))
        if self.accuracy_floor is not None:
            request.accuracy_floor = self.accuracy_floor
        return request

    def weights(self) -> rule_rewards_pb2.RuleRewardWeights:
        weights = rule_rewards_pb2.RuleRewardWeights()
        for name in ("accuracy", "hallucination", "keyword"):
            value = getattr(self, f"{name}_weight")
            if value is not None:
                setattr(weights, name, value)
        return weights


# Failures of a merged request that are about the call, not its items: every caller gets them, as
# sending each call again could only fail the same way, N times over. RESOURCE_EXHAUSTED too: the
# connection has already retried it with backoff, and N separate calls would only add to the overload.
_CALL_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED})

_ITEM_FIELD = re.compile(r"^items\[(\d+)\]")


def _rebase_rule_result(result: RuleResult, offset: int) -> RuleResult:
    """A result of a merged request as its caller sees it: "items[k]" of its error renumbered from the caller's first item."""
    error = result.error
    match = _ITEM_FIELD.match(error.field) if error is not None else None
    if error is None or match is None:
        return result
    field = f"items[{int(match.group(1)) - offset}]{error.field[match.end():]}"
    return dataclasses.replace(result, error=dataclasses.replace(error, field=field))


class AsyncRuleRewardsClient(AsyncClient):
    """Client of the rule-reward service: the ASR paper's R1 accuracy, R2 hallucination, R3 keywords.

    Calls to `score` made in the same event-loop iteration (many tasks, or many threads through the
    sync client) with the same weights, timeout_s, REQUEST_ID and CALLER_DEADLINE are sent as one
    request of up to 256 items, and each caller gets its own results: one gRPC call costs ~0.5-0.9 ms
    of client and server CPU, more than scoring one item (~0.4 ms), so per-sample reward loops
    otherwise spend most of their time on calls. No wait is added (see `speechrl.client.coalescing`).
    If a merged request fails as a whole (e.g. INVALID_ARGUMENT), each call is sent again on its own
    so that each caller gets its own outcome.

    Args:
        endpoints, **options: as for every client (see `AsyncClient`).
        coalesce: merge concurrent calls as above; False sends one request per call.
    """

    SERVICE = "speechrl.v1.RuleRewards"
    DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_PORTS['rules']}"

    def __init__(self, endpoints: Endpoints | None = None, *, coalesce: bool = True, **options: Unpack[ClientOptions]):
        super().__init__(endpoints, **options)
        self._coalescer: Coalescer[_RulesKey, rule_rewards_pb2.RuleRewardItem, RuleResult] | None = (
            Coalescer(self._send, rebase=_rebase_rule_result,
                      resend_alone=lambda error: isinstance(error, ServiceError) and error.code not in _CALL_FAILURES)
            if coalesce else None)

    async def score(self, hypotheses: Sequence[str], references: Sequence[str], *,
                    keywords: Sequence[Sequence[str]] | None = None, language: str | Sequence[str] = "",
                    accuracy_weight: float | None = None, hallucination_weight: float | None = None,
                    keyword_weight: float | None = None, accuracy_mapping: str | None = None,
                    accuracy_floor: float | None = None, timeout_s: float | None = None) -> list[RuleResult]:
        """Score each hypothesis against its reference.

        Args:
            keywords: one keyword list per item (for R3), or None for none.
            language: ISO 639-1 code for all items or one per item; "" means "en".
            *_weight: weights of the total; None keeps the server default (1, 1, 0).
            accuracy_mapping: how WER becomes R1, a name of speechrl.rewards.WER_MAPPINGS; None: one_minus_wer.
            accuracy_floor: lowest R1, in [-10, 0]; None: 0 (the paper's clip). -1 lets R1 tell a long
                loop (WER 2) from a plain miss (WER 1).
        """
        count = _same_length(hypotheses=hypotheses, references=references)
        keyword_lists = [()] * count if keywords is None else _per_item(keywords, count, "keywords")
        languages = _per_item(language, count, "language")
        items = [rule_rewards_pb2.RuleRewardItem(hypothesis=h, reference=r, keywords=list(k), language=lang)
                 for h, r, k, lang in zip(hypotheses, references, keyword_lists, languages, strict=True)]
        key = _RulesKey(accuracy_weight, hallucination_weight, keyword_weight, accuracy_mapping, accuracy_floor,
                        timeout_s, REQUEST_ID.get(), CALLER_DEADLINE.get())
        if self._coalescer is None:
            return await self._send(key, items)
        return await self._coalescer.submit(key, items)

    async def _send(self, key: _RulesKey, items: Sequence[rule_rewards_pb2.RuleRewardItem]) -> list[RuleResult]:
        """One ScoreRules request; REQUEST_ID and CALLER_DEADLINE are read from the context it runs in."""
        reply = await self.connection.unary(rule_rewards_pb2_grpc.RuleRewardsStub, "ScoreRules", key.request(items),
                                            key.timeout_s)
        _check_count(reply.results, len(items), "ScoreRules")
        return [rule_result(r) for r in reply.results]


class AsyncAudioEncoderClient(AsyncClient):
    """Client of the audio encoder: audio in, [T, D] embeddings in the LLM's input space out."""

    SERVICE = "speechrl.v1.AudioEncoder"
    DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_PORTS['encoder']}"

    async def encode(self, audios: Sequence[AudioLike], *, output_dtype: str = "float32",
                     timeout_s: float | None = None) -> list[EncodedAudio]:
        """Encode each audio; the server streams one reply per item and they are put back in order.

        Args:
            output_dtype: element type of the embeddings: "float32", "float16" or "bfloat16"
                (bfloat16 arrives widened to float32 numpy).
        """
        request = encoder_pb2.EncodeAudioRequest(
            audios=[to_audio(a) for a in audios], output_dtype=enum_value(common_pb2.DType, output_dtype, "DTYPE_"))
        replies = await self.connection.server_stream(encoder_pb2_grpc.AudioEncoderStub, "EncodeAudio", request, timeout_s)
        results: list[EncodedAudio | None] = [None] * len(audios)
        for reply in replies:
            if not 0 <= reply.index < len(audios) or results[reply.index] is not None:
                raise ServiceError(grpc.StatusCode.INTERNAL, f"EncodeAudio sent index {reply.index} twice or out of range")
            results[reply.index] = encoded_audio(reply)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"EncodeAudio stream ended without items {missing}")
        return [r for r in results if r is not None]


def _prompt(prompt: PromptLike, suffix: Sequence[int] | None, prefix: Sequence[int] | None = None) -> rollout_pb2.Prompt:
    if isinstance(prompt, rollout_pb2.Prompt):
        return prompt
    if isinstance(prompt, str):
        return rollout_pb2.Prompt(text=prompt)
    if isinstance(prompt, np.ndarray) and prompt.dtype.kind == "f":
        message = rollout_pb2.Prompt(embeddings=numpy_to_tensor(prompt))
        if suffix:
            message.suffix_token_ids.ids.extend(suffix)
        if prefix:
            message.prefix_token_ids.ids.extend(prefix)
        return message
    return rollout_pb2.Prompt(token_ids=rollout_pb2.TokenIds(ids=[int(t) for t in prompt]))


class AsyncRolloutClient(AsyncClient):
    """Client of the rollout generator: sample completions, load new policy weights."""

    SERVICE = "speechrl.v1.RolloutGenerator"
    DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_PORTS['rollout']}"

    async def generate(self, prompts: Sequence[PromptLike], *, max_tokens: int, n: int = 1,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       stop: Sequence[str] = (), seed: int | None = None, speech_token_range: tuple[int, int] | None = None,
                       suffix_token_ids: Sequence[int] | None = None, prefix_token_ids: Sequence[int] | None = None,
                       timeout_s: float | None = None) -> list[PromptResult]:
        """Sample n completions per prompt.

        Args:
            prompts: text, token ids, float [T, D] embeddings or Prompt messages.
            speech_token_range: [begin, end) ids; when set, only speech tokens are generated (TTS).
            suffix_token_ids: token ids appended after every embeddings prompt (e.g. an instruction).
            prefix_token_ids: token ids put before every embeddings prompt (a speech LLM's chat template up to
                its audio placeholder).
        """
        sampling = rollout_pb2.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                              max_tokens=max_tokens, stop=list(stop))
        if seed is not None:
            sampling.seed = seed
        request = rollout_pb2.GenerateRequest(prompts=[_prompt(p, suffix_token_ids, prefix_token_ids) for p in prompts],
                                              sampling=sampling)
        if speech_token_range is not None:
            request.mode = rollout_pb2.GENERATION_MODE_SPEECH_TOKENS
            request.speech_token_range.begin, request.speech_token_range.end = speech_token_range
        reply = await self.connection.unary(rollout_pb2_grpc.RolloutGeneratorStub, "Generate", request, timeout_s)
        _check_count(reply.results, len(prompts), "Generate")
        return [prompt_result(r) for r in reply.results]

    async def update_weights(self, version: int, path: str, *, format: str = "full", fence: int = 0,
                             timeout_s: float | None = None) -> int:
        """Load new weights ("full" safetensors file or "lora" adapter folder); returns the version now sampling.

        A retry after a reply was lost cannot apply weights twice: the server refuses a version that is
        not newer than its own with INVALID_ARGUMENT, which then tells the caller to check `version`.
        fence: the fencing token of the GPU-lease grant the weights were made under; a push with a lower
        token than the last accepted one raises StaleFenceError (0: no lease, not checked).
        """
        request = rollout_pb2.UpdateWeightsRequest(version=version, path=path, fencing_token=fence,
                                                   format=enum_value(rollout_pb2.WeightsFormat, format, "WEIGHTS_FORMAT_"))
        reply = await self.connection.unary(rollout_pb2_grpc.RolloutGeneratorStub, "UpdateWeights", request, timeout_s)
        return int(reply.version)


class AsyncToken2WavClient(AsyncClient):
    """Client of the token2wav service: an LLM-TTS policy's speech tokens rendered as audio."""

    SERVICE = "speechrl.v1.Token2Wav"
    DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_PORTS['token2wav']}"

    async def synthesize(self, token_lists: Sequence[Sequence[int]], *, voice: str | Sequence[str] = "",
                         rate_wpm: int | Sequence[int] = 0,
                         prompt_audio: AudioLike | list[AudioLike] | None = None,
                         timeout_s: float | None = None) -> list[SynthesizedSpeech]:
        """Render each token sequence as a WAV file.

        Args:
            token_lists: speech-token ids per item, 0-based within the server's token range (a
                policy's vocabulary offset removed, as CosyVoice's <|s_N|> numbers them).
            voice: backend voice for all items or one per item (espeak-phonemes: "en-us"); "" is the
                server's default.
            rate_wpm: speaking rate for all items or one per item (espeak-phonemes); 0 is the server's.
            prompt_audio: a prompt utterance of the target speaker (cosyvoice2), for every item or,
                as a list, one per item (None entries: no prompt).
        """
        count = len(token_lists)
        voices = _per_item(voice, count, "voice")
        rates = _per_item(rate_wpm, count, "rate_wpm")
        # A tuple is one (samples, rate) clip, so only a list means "one per item".
        prompts = _per_item(prompt_audio, count, "prompt_audio") if isinstance(prompt_audio, list) \
            else [prompt_audio] * count
        encoded: dict[int, common_pb2.Audio] = {}  # a group's items share one prompt: encode it once
        for prompt in prompts:
            if prompt is not None and id(prompt) not in encoded:
                encoded[id(prompt)] = to_audio(prompt)
        request = token2wav_pb2.SynthesizeRequest(items=[
            token2wav_pb2.SynthesisItem(tokens=[int(t) for t in tokens], voice=v, rate_wpm=int(r),
                                        prompt_audio=None if p is None else encoded[id(p)])
            for tokens, v, r, p in zip(token_lists, voices, rates, prompts, strict=True)])
        reply = await self.connection.unary(token2wav_pb2_grpc.Token2WavStub, "Synthesize", request, timeout_s)
        _check_count(reply.results, count, "Synthesize")
        return [synthesized_speech(r) for r in reply.results]

    async def score_tokens(self, token_lists: Sequence[Sequence[int]], texts: Sequence[str], *,
                           timeout_s: float | None = None) -> list[TokenScoreResult]:
        """log P(text | tokens) of each pair under the server's Token2Reward, and its reward in [0, 1].

        A reward without audio (DiffRO's token-input ASR); the server needs a Token2Reward checkpoint
        (--token2reward), else FAILED_PRECONDITION.

        Args:
            token_lists: speech-token ids per item, 0-based as for synthesize.
            texts: what each item should say, one per item.
        """
        if len(texts) != len(token_lists):
            raise ValueError(f"{len(token_lists)} token lists but {len(texts)} texts: one text per item")
        request = token2wav_pb2.ScoreTokensRequest(items=[
            token2wav_pb2.TokenTextItem(tokens=[int(t) for t in tokens], text=text)
            for tokens, text in zip(token_lists, texts, strict=True)])
        reply = await self.connection.unary(token2wav_pb2_grpc.Token2WavStub, "ScoreTokens", request, timeout_s)
        _check_count(reply.results, len(texts), "ScoreTokens")
        return [token_score_result(r) for r in reply.results]

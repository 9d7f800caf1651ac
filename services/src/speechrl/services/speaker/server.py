"""Entry point of the speaker-similarity server: `speechrl serve speaker`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from speechrl.rewards import SIMILARITY_MAPPINGS
from speechrl.services.batching import DynamicBatcher, load_on_model_thread
from speechrl.services.config import ServerConfig, option
from speechrl.services.errors import ItemFailure
from speechrl.services.ports import DEFAULT_PORTS
from speechrl.services.residency import make_guard
from speechrl.services.server import (
    RunningServer,
    ServiceSpec,
    serve_main,
    start_server,
    status_response,
)
from speechrl.services.speaker.backends import BACKENDS, load_backend
from speechrl.services.speaker.engine import SpeakerEngine, SpeakerOutcome, SpeakerWork
from speechrl.services.speaker.servicer import SpeakerSimilarityServicer
from speechrl.v1 import common_pb2, speaker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "speaker"
SERVICE_NAME = "speechrl.v1.SpeakerSimilarityScorer"
DEFAULT_PORT = DEFAULT_PORTS[SERVICE]


@dataclass
class SpeakerConfig(ServerConfig):
    """Settings of the speaker-similarity server (flags, or SPEECHRL_SPEAKER_* variables)."""

    backend: str = option("resemblyzer", "Speaker-embedding backend: resemblyzer (bundled weights, works offline), "
                          "wespeaker-onnx (an ONNX export, as sherpa-onnx loads) or wespeaker-checkpoint (a folder "
                          "with config.yaml + avg_model.pt; needs the wespeaker package). Same choice on a GPU box.")
    model_path: str = option("", "Model to load: empty for Resemblyzer's bundled weights (or a .pt of its format); "
                             "the .onnx file for wespeaker-onnx; the model folder (config.yaml + avg_model.pt) "
                             "or its .pt file for wespeaker-checkpoint.")
    default_reward_mapping: str = option("cosine", "Reward of a request that leaves reward_mapping unset: cosine "
                                         "(raw, [-1, 1], seed-tts-eval's SIM), shifted ((cos + 1) / 2) or clipped "
                                         "(max(cos, 0)).")
    max_speakers: int = option(10_000, "Registered speakers kept, in this process's memory only (lost on restart); "
                               "beyond it the least recently used is forgotten and scoring it gives UNKNOWN_SPEAKER.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.backend != "resemblyzer" and not self.model_path:
            raise ValueError(f"backend {self.backend} needs --model-path (SPEECHRL_SPEAKER_MODEL_PATH)")
        if self.default_reward_mapping not in SIMILARITY_MAPPINGS:
            raise ValueError(f"default_reward_mapping must be one of {sorted(SIMILARITY_MAPPINGS)}, "
                             f"got {self.default_reward_mapping!r}")
        if self.max_speakers < 1:
            raise ValueError(f"max_speakers must be >= 1, got {self.max_speakers}")


def build_engine(config: SpeakerConfig) -> SpeakerEngine:
    """Load the backend (on the CPU; it enters its device with the first batch) and wrap it in the engine."""
    backend = load_backend(config.backend, config.model_path, config.device, config.threads)
    return SpeakerEngine(backend, config.max_audio_seconds, config.default_reward_mapping, config.max_speakers)


async def warm_up(engine: SpeakerEngine, batcher: DynamicBatcher[SpeakerWork, SpeakerOutcome]) -> float:
    """One batch of synthetic audio through the batcher (model thread, GPU lease); returns its seconds."""
    start = time.perf_counter()
    results = await batcher.submit(engine.warm_up_items())
    failures = [r for r in results if isinstance(r, ItemFailure)]
    if failures:
        raise RuntimeError(f"warm-up failed: {failures[0]}")
    batcher.items_processed = 0  # warm-up items are not requests; keep GetServiceStatus's counts honest
    return time.perf_counter() - start


async def start(config: SpeakerConfig) -> RunningServer:
    """Load the backend, warm it up, and start serving; returns the running server.

    Warm-up runs through the batcher before the port opens, so the first request pays neither
    model load nor first-forward costs, and it already holds the GPU lease like any batch.
    """
    thread, engine = await load_on_model_thread(SERVICE, build_engine, config)  # seconds of loading
    backend = engine.backend
    guard = make_guard(config, backend, owner=f"{SERVICE}-{os.getpid()}")
    batcher: DynamicBatcher[SpeakerWork, SpeakerOutcome] = DynamicBatcher.configured(
        engine.process, config, SERVICE, guard=guard, executor=thread)
    try:
        seconds = await warm_up(engine, batcher)
    except BaseException:
        batcher.close()
        raise
    log.info("speaker backend %s (%s, dim %d) warmed up in %.2f s", backend.name, backend.model, engine.dim, seconds)

    def describe() -> common_pb2.GetServiceStatusResponse:
        return status_response(SERVICE_NAME, backend.name, backend.model, config, batcher)

    servicer = SpeakerSimilarityServicer(engine, batcher, config.max_request_items)
    spec = ServiceSpec(SERVICE_NAME, servicer, speaker_pb2_grpc.add_SpeakerSimilarityScorerServicer_to_server)
    return await start_server(config, DEFAULT_PORT, [spec], describe, on_stop=batcher.close)


def main(argv: Sequence[str] | None = None) -> None:
    """`speechrl serve speaker`: flags and SPEECHRL_SPEAKER_* variables, then serve until SIGTERM."""
    serve_main(SpeakerConfig, SERVICE, start, argv, description="Serve speaker similarity over gRPC.")

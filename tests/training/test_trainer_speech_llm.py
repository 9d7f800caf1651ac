"""GRPO on real speech-LLM checkpoints (Qwen3-ASR, Qwen2-Audio) through the real encoder, rollout and rule
services and Redis: a tiny random checkpoint in the library's format is the job's policy folder; two steps
move its text decoder and leave its audio half alone, the rollout service's version follows the trainer's,
and the checkpoint the job writes loads with the library's own class and gives the same greedy tokens, for
the family's transcription prompt, as the rollout service now serving the trainer's last weights."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from speechrl.client import AudioEncoderClient, RolloutClient
from speechrl.services.encoder.server import EncoderConfig
from speechrl.services.encoder.server import start as start_encoder
from speechrl.services.ports import free_port
from speechrl.services.rollout.server import RolloutConfig
from speechrl.services.rollout.server import start as start_rollout
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.services.speech_llm import qwen3_asr_prompt
from speechrl.trainer.jobs.asr import AsrGrpo, AsrJobConfig
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.datasets import read_manifest
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.models.asr_policy import AsrPolicy, PromptLayout
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from tests.support.servers import RedisServer, serve_in_thread
from tests.support.speech_llm import BUILDERS, build_qwen3_asr, library_greedy
from tests.support.training import Recorder, assert_lora_merged

AUDIO_HALF = ("audio_tower", "multi_modal_projector")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_asr_dataset(DataConfig(out=str(tmp_path_factory.mktemp("data")), train=4, dev=2, test=0,
                                        long_test=0), progress=False)


@dataclass
class TrainedThroughServices:
    """What two steps through the services left: the job's last checkpoint, the layout its session used, the
    rollout service's greedy tokens for a dev clip under that layout, and the clip's embeddings."""

    checkpoint: Path
    layout: PromptLayout
    served: list[int]
    clip: np.ndarray
    embeddings: np.ndarray


class WatchedAsrGrpo(AsrGrpo):
    """The asr-grpo kind, remembering the prompt layout its session trained and sampled with."""

    layout: PromptLayout | None = None

    @contextlib.asynccontextmanager
    async def connect(self, config: AsrJobConfig, policy: AsrPolicy) -> AsyncIterator[Any]:
        async with super().connect(config, policy) as session:
            self.layout = session.policy.layout
            yield session


def two_steps(folder: Path, manifest: Path, out: Path, redis_url: str, **job: Any) -> TrainedThroughServices:
    configs = [(start_rules, RulesConfig(port=free_port())),
               (start_encoder, EncoderConfig(port=free_port(), backend="speech-llm", model_path=str(folder), threads=1)),
               (start_rollout, RolloutConfig(port=free_port(), model_path=str(folder), threads=1, max_wait_ms=2))]
    with ExitStack() as servers:
        rules, encoder, rollout = (f"127.0.0.1:{servers.enter_context(serve_in_thread(lambda s=s, c=c: s(c))).port}"
                                   for s, c in configs)
        lora = bool(job.get("grpo", {}).get("lora"))
        grpo = {"group_size": 4, "batch_size": 2, "mini_batch_size": 8, "learning_rate": 1e-2,
                "max_completion_length": 24, **job.pop("grpo", {})}
        config = AsrJobConfig(policy=str(folder), data=str(manifest), steps=2, out_dir=str(out), eval_split="dev",
                              eval_size=2, eval_every=2, checkpoint_every=1, encoder=encoder, rollout=rollout,
                              rules=rules, lease_device="cpu:0", redis_url=redis_url, grpo=grpo, **job)
        recorder, kind = Recorder(), WatchedAsrGrpo()
        run_job(kind, config, recorder)
        assert [s for s, _ in recorder.steps] == [1, 2]
        last = 4 if lora else 3  # the first push (under LoRA: the base, then the adapters), then one per step
        assert recorder.steps[-1][1]["policy_version"] == last
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None and checkpoint.name == "step-000002"
        assert kind.layout is not None

        row = read_manifest(str(manifest), "dev")[0]
        with AudioEncoderClient(encoder) as encoder_client, RolloutClient(rollout) as rollout_client:
            assert rollout_client.get_service_status().policy_version == last
            [embeddings] = [np.asarray(r.unwrap()) for r in encoder_client.encode([str(row.audio)])]
            [result] = rollout_client.generate([embeddings], n=1, temperature=0.0, max_tokens=NEW_TOKENS,
                                               **kind.layout.token_ids_around_audio())
            served = list(result.unwrap()[0].token_ids)
    assert served, "the greedy completion is empty: nothing to compare"
    clip, _ = sf.read(str(row.audio), dtype="float32")
    return TrainedThroughServices(checkpoint, kind.layout, served, clip, embeddings)


def assert_library_decodes_as_served(run: TrainedThroughServices) -> None:
    """The checkpoint, loaded by the library's own class, greedily decodes the clip as the rollout service did;
    so does the trainer's own reading of it."""
    saved, layout = run.checkpoint / "policy", run.layout
    assert run.served == library_greedy(saved, run.clip, list(layout.prefix_ids), run.embeddings.shape[0],
                                        list(layout.instruction_ids), NEW_TOKENS)
    trained = AsrPolicy.load(saved)
    trained.layout = layout
    assert trained.transcribe([torch.tensor(run.embeddings)], [NEW_TOKENS]) == [trained.decode(run.served)]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_two_grpo_steps_on_a_speech_llm_checkpoint(family: str, manifest: Path, tmp_path: Path,
                                                    redis_server: RedisServer) -> None:
    folder = BUILDERS[family](tmp_path / family)
    layout = PromptLayout.load(folder)
    assert layout.prefix_ids and layout.instruction_ids and layout.frontend_backend == "speech-llm"
    run = two_steps(folder, manifest, tmp_path / "run", redis_server.url)
    assert run.layout == layout

    before, after = load_file(str(folder / "model.safetensors")), load_file(str(run.checkpoint / "policy" /
                                                                                 "model.safetensors"))
    assert before.keys() == after.keys(), "the checkpoint keeps the family's own tensor names"
    audio_half = [n for n in before if any(part in n for part in AUDIO_HALF)]
    decoder = [n for n in before if n not in audio_half]
    assert audio_half and all(torch.equal(before[n], after[n]) for n in audio_half), "the audio half is frozen"
    moved = [n for n in decoder if not torch.equal(before[n], after[n])]
    assert len(moved) > len(decoder) // 2, f"only {moved} of the decoder moved"
    assert_library_decodes_as_served(run)


def test_lora_with_a_prompt_of_its_own(manifest: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    """LoRA on Qwen3-ASR with another language forced in its prompt: the session samples and trains with that
    prompt, the checkpoint holds the adapters and the model with them merged, which the library loads as
    Qwen3-ASR and which decodes as the rollout service (base + adapter) does."""
    folder = build_qwen3_asr(tmp_path / "qwen3_asr")
    prompt = qwen3_asr_prompt("Chinese")
    run = two_steps(folder, manifest, tmp_path / "run", redis_server.url, asr_prompt=prompt,
                    grpo={"lora": True, "lora_r": 4, "lora_alpha": 8})
    family = PromptLayout.load(folder)
    assert run.layout == PromptLayout.of_speech_llm(folder, prompt=prompt) != family
    assert run.layout.prefix_ids == family.prefix_ids and run.layout.instruction_ids != family.instruction_ids

    assert_lora_merged(folder, tmp_path / "run", "step-000002")
    assert_library_decodes_as_served(run)


def test_a_prompt_needs_its_audio_and_a_speech_llm(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"asr_prompt must hold \{audio\} exactly once"):
        AsrJobConfig(policy=str(tmp_path), data=str(manifest), asr_prompt="Transcribe: ")
    own = tmp_path / "own"  # a SpeechRL LLM-ASR folder: a qwen2 config and its asr_layout.json
    own.mkdir()
    (own / "config.json").write_text('{"model_type": "qwen2"}')
    config = AsrJobConfig(policy=str(own), data=str(manifest), asr_prompt="Transcribe: {audio}")
    with pytest.raises(ValueError, match="is a SpeechRL LLM-ASR policy, whose instruction is its asr_layout.json"):
        AsrGrpo().check(config, distributed=False)

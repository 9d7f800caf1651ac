"""GRPO on real speech-LLM checkpoints (Qwen3-ASR, Qwen2-Audio) through the real encoder, rollout and rule
services and Redis: a tiny random checkpoint in the library's format is the job's policy folder; two steps
move its text decoder and leave its audio half alone, the rollout service's version follows the trainer's,
and the checkpoint the job writes loads with the library's own class and gives the same greedy tokens, for
the family's transcription prompt, as the rollout service now serving the trainer's last weights."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

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
from speechrl.trainer.jobs.asr import AsrJobConfig
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.datasets import read_manifest
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.models.asr_policy import AsrPolicy, PromptLayout
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from tests.support.servers import RedisServer, serve_in_thread
from tests.support.speech_llm import BUILDERS, library_greedy
from tests.support.training import Recorder

AUDIO_HALF = ("audio_tower", "multi_modal_projector")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_asr_dataset(DataConfig(out=str(tmp_path_factory.mktemp("data")), train=4, dev=2, test=0,
                                        long_test=0), progress=False)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_two_grpo_steps_on_a_speech_llm_checkpoint(family: str, manifest: Path, tmp_path: Path,
                                                    redis_server: RedisServer) -> None:
    folder = BUILDERS[family](tmp_path / family)
    layout = PromptLayout.load(folder)
    assert layout.prefix_ids and layout.instruction_ids and layout.frontend_backend == "speech-llm"
    configs = [(start_rules, RulesConfig(port=free_port())),
               (start_encoder, EncoderConfig(port=free_port(), backend="speech-llm", model_path=str(folder), threads=1)),
               (start_rollout, RolloutConfig(port=free_port(), model_path=str(folder), threads=1, max_wait_ms=2))]
    with ExitStack() as servers:
        rules, encoder, rollout = (f"127.0.0.1:{servers.enter_context(serve_in_thread(lambda s=s, c=c: s(c))).port}"
                                   for s, c in configs)
        out = tmp_path / "run"
        job = AsrJobConfig(policy=str(folder), data=str(manifest), steps=2, out_dir=str(out), eval_split="dev",
                           eval_size=2, eval_every=2, checkpoint_every=1, encoder=encoder, rollout=rollout, rules=rules,
                           lease_device="cpu:0", redis_url=redis_server.url,
                           grpo={"group_size": 4, "batch_size": 2, "mini_batch_size": 8, "learning_rate": 1e-2,
                                 "max_completion_length": 24})
        recorder = Recorder()
        run_job("asr-grpo", job, recorder)
        assert [s for s, _ in recorder.steps] == [1, 2]
        assert recorder.steps[-1][1]["policy_version"] == 3  # the first push, then one per step

        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None and checkpoint.name == "step-000002"
        before, after = load_file(str(folder / "model.safetensors")), load_file(str(checkpoint / "policy" /
                                                                                     "model.safetensors"))
        assert before.keys() == after.keys(), "the checkpoint keeps the family's own tensor names"
        audio_half = [n for n in before if any(part in n for part in AUDIO_HALF)]
        decoder = [n for n in before if n not in audio_half]
        assert audio_half and all(torch.equal(before[n], after[n]) for n in audio_half), "the audio half is frozen"
        moved = [n for n in decoder if not torch.equal(before[n], after[n])]
        assert len(moved) > len(decoder) // 2, f"only {moved} of the decoder moved"

        row = read_manifest(str(manifest), "dev")[0]
        with AudioEncoderClient(encoder) as encoder_client, RolloutClient(rollout) as rollout_client:
            assert rollout_client.get_service_status().policy_version == 3
            [embeddings] = [np.asarray(r.unwrap()) for r in encoder_client.encode([str(row.audio)])]
            [result] = rollout_client.generate([embeddings], n=1, temperature=0.0, max_tokens=NEW_TOKENS,
                                               **layout.token_ids_around_audio())
            served = list(result.unwrap()[0].token_ids)
    assert served, "the greedy completion is empty: nothing to compare"
    saved = checkpoint / "policy"
    clip, _ = sf.read(str(row.audio), dtype="float32")
    assert served == library_greedy(saved, clip, list(layout.prefix_ids), embeddings.shape[0],
                                    list(layout.instruction_ids), NEW_TOKENS)
    trained = AsrPolicy.load(saved)  # the trainer's own reading of what it saved: the same greedy tokens
    assert trained.transcribe([torch.tensor(embeddings)], [NEW_TOKENS]) == [trained.decode(served)]

"""TTS RL through the real services and Redis (issue 7): two steps of each of tts-grpo, tts-diffro and
tts-grpo+diffro change the weights, keep the rollout service's version in step with the trainer's,
and log every reward component. Real audio (espeak-ng via token2wav), real scorers (Whisper tiny.en,
Resemblyzer, Token2Reward served by token2wav); the policy and the Token2Reward are tiny and barely
trained, so this is about plumbing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from speechrl.client import RolloutClient
from speechrl.services.cosyvoice2 import CosyVoice2Layout, export_llm, import_llm
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rollout.server import RolloutConfig
from speechrl.services.rollout.server import start as start_rollout
from speechrl.services.speaker.server import SpeakerConfig
from speechrl.services.speaker.server import start as start_speaker
from speechrl.services.token2wav import token2reward
from speechrl.services.token2wav.backends.cosyvoice2 import CosyVoice2Backend
from speechrl.services.token2wav.random_cosyvoice2 import build_token2wav_folder
from speechrl.services.token2wav.server import Token2WavConfig
from speechrl.services.token2wav.server import start as start_token2wav
from speechrl.services.token2wav.tokens import VOCABULARY
from speechrl.trainer.jobs.datasets import read_corpus
from speechrl.trainer.jobs.registry import JobConfigError, parse_job, run_job
from speechrl.trainer.jobs.tts import TtsJobConfig
from speechrl.trainer.recipes.token2reward import train as train_token2reward
from speechrl.trainer.recipes.tts_warmstart import TtsWarmStartConfig, run_tts_warmstart
from tests.support.cosyvoice2 import OriginalLLM, build_cosyvoice2_folder, load_original
from tests.support.servers import RedisServer, serve_in_thread
from tests.support.training import Recorder, assert_lora_merged, assert_most_weights_moved

COMPONENTS = ("intelligibility", "speaker", "duration", "diversity")


@dataclass
class Stack:
    policy: Path
    corpus: Path
    reward_model: Path
    endpoints: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The warm-started policy and corpus, a Token2Reward, and every service the TTS kinds call."""
    root = tmp_path_factory.mktemp("tts-rl")
    summary = run_tts_warmstart(TtsWarmStartConfig(out=str(root / "warm"), train=6, dev=2, test=0, hidden_size=64,
                                                   num_layers=1, steps=15, batch_size=6, threads=1))
    pairs = [(r["tokens"], r["text"]) for r in read_corpus(summary["corpus"], "train")]
    reward_model = train_token2reward(pairs, token2reward.Token2RewardConfig(num_tokens=len(VOCABULARY), d_model=32,
                                                                             layers=1, heads=2), steps=5, batch_size=6)
    token2reward.save(reward_model, root / "t2r")
    starts = {"rollout": lambda: start_rollout(RolloutConfig(port=free_port(), model_path=summary["policy"], threads=1)),
              "token2wav": lambda: start_token2wav(Token2WavConfig(port=free_port(), token2reward=str(root / "t2r"))),
              "intelligibility": lambda: start_intelligibility(IntelligibilityConfig(port=free_port(), threads=1)),
              "speaker": lambda: start_speaker(SpeakerConfig(port=free_port(), threads=1))}
    with ExitStack() as servers:
        endpoints = {name: f"127.0.0.1:{servers.enter_context(serve_in_thread(start)).port}"
                     for name, start in starts.items()}
        yield Stack(Path(summary["policy"]), Path(summary["corpus"]), root / "t2r", endpoints)


@pytest.fixture(scope="module")
def cosyvoice2_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, OriginalLLM]]:
    """A tiny random CosyVoice2 LLM converted from llm.pt, served by its own rollout service beside stack's
    other services. Its speech tokens are espeak's phonemes (K = len(VOCABULARY)), so token2wav renders them."""
    root = tmp_path_factory.mktemp("cosyvoice2")
    original = build_cosyvoice2_folder(root / "CosyVoice2", len(VOCABULARY))
    policy = Path(import_llm(root / "CosyVoice2", root / "policy"))
    with serve_in_thread(lambda: start_rollout(RolloutConfig(port=free_port(), model_path=str(policy), threads=1))) \
            as rollout:
        yield Stack(policy, stack.corpus, stack.reward_model,
                    {**stack.endpoints, "rollout": f"127.0.0.1:{rollout.port}"}), original


@pytest.fixture(scope="module")
def whole_cosyvoice2_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A whole tiny random CosyVoice2 folder (its LLM over the real 6561 speech tokens, its flow, HiFT and
    frontend ONNX files): the LLM converted and served by a rollout service, the rest by a token2wav service
    with the cosyvoice2 backend, beside stack's scorers."""
    folder = tmp_path_factory.mktemp("cosyvoice2-whole") / "CosyVoice2"
    build_cosyvoice2_folder(folder, CosyVoice2Backend.num_tokens)
    build_token2wav_folder(folder)
    policy = Path(import_llm(folder, folder.parent / "policy"))
    # DiffRO's token-input ASR over the same 6561 tokens: untrained, as only the plumbing is under test.
    reward_model = folder.parent / "t2r"
    token2reward.save(token2reward.Token2Reward(token2reward.Token2RewardConfig(
        num_tokens=CosyVoice2Backend.num_tokens, d_model=32, layers=1, heads=2)), reward_model)
    starts = {"rollout": lambda: start_rollout(RolloutConfig(port=free_port(), model_path=str(policy), threads=1)),
              "token2wav": lambda: start_token2wav(Token2WavConfig(port=free_port(), backend="cosyvoice2",
                                                                   model_dir=str(folder), threads=1))}
    with ExitStack() as servers:
        endpoints = {name: f"127.0.0.1:{servers.enter_context(serve_in_thread(start)).port}"
                     for name, start in starts.items()}
        yield Stack(policy, stack.corpus, reward_model, {**stack.endpoints, **endpoints})


def job(stack: Stack, out: Path, redis_url: str, kind: str, speakers: dict[str, str] | None = None,
        **grpo: Any) -> TtsJobConfig:
    """A two-step job of kind, read as a job file is (the kind sets grpo.loss)."""
    _, config = parse_job(dict(
        kind=kind, policy=str(stack.policy), data=str(stack.corpus), token2reward=str(stack.reward_model),
        **(speakers or {"voices": "en-us,en-gb+f3"}), steps=2, checkpoint_every=1, out_dir=str(out),
        lease_device="cpu:0", redis_url=redis_url, **stack.endpoints,
        grpo={"group_size": 2, "batch_size": 2, "mini_batch_size": 4, "learning_rate": 1e-2,
              "max_completion_length": 48, "kl_beta": 0.05, "diffro_beta": 0.05, **grpo}))
    assert isinstance(config, TtsJobConfig)
    return config


@pytest.mark.parametrize(("kind", "grpo", "extra"), [
    # Token2Reward's ScoreTokens from the token2wav service as a fifth weighted component.
    ("tts-grpo", {"reward_weights": {"token2reward": 0.5}}, ("kl", "clip_fraction", "reward/token2reward")),
    ("tts-diffro", {}, ("diffro_reward", "diffro_kl")),
    ("tts-grpo+diffro", {"diffro_filter": False}, ("grpo_loss", "diffro_loss", "diffro_reward", "kl")),
])
def test_two_steps_through_the_services(stack: Stack, tmp_path: Path, redis_server: RedisServer, kind: str,
                                        grpo: dict[str, Any], extra: tuple[str, ...]) -> None:
    out = tmp_path / kind
    with RolloutClient(stack.endpoints["rollout"]) as rollout:
        before = rollout.get_service_status().policy_version
    recorder = Recorder()
    run_job(kind, job(stack, out, redis_server.url, kind, **grpo), recorder)
    assert [s for s, _ in recorder.steps] == [1, 2]
    for _, metrics in recorder.steps:
        for key in (*(f"reward/{c}" for c in COMPONENTS), "reward_mean", "wer", "sim", "loss", "grad_norm", *extra,
                    "time/rollout", "time/token2wav", "time/score", "time/update", "time/sync"):
            assert math.isfinite(metrics[key]), (key, metrics.get(key))
        assert "reward/f0" in metrics  # weight 0 by default: not computed, logged as NaN
    # The first sync, then one per step: every rollout came from the trainer's newest weights.
    with RolloutClient(stack.endpoints["rollout"]) as rollout:
        assert rollout.get_service_status().policy_version == before + 3 == recorder.steps[-1][1]["policy_version"]
    assert_most_weights_moved(stack.policy, out, "step-000002")


def test_the_kind_sets_the_loss(stack: Stack) -> None:
    values = {"policy": str(stack.policy), "data": str(stack.corpus)}
    kind, config = parse_job({"kind": "tts-grpo+diffro", **values})
    assert kind == "tts-grpo+diffro" and isinstance(config, TtsJobConfig)
    with pytest.raises(JobConfigError, match="reward_weights names 'wer'"):
        parse_job({"kind": "tts-grpo", **values, "grpo": {"reward_weights": {"wer": 1.0}}})
    with pytest.raises(FileNotFoundError, match=r"prompt_audio names files that do not exist: \['/no/such.wav'\]"):
        TtsJobConfig(**values, prompt_audio="/no/such.wav")
    with pytest.raises(ValueError, match="tts-diffro jobs use loss 'diffro'"):
        run_job("tts-diffro", TtsJobConfig(**values, grpo={"loss": "grpo"}), Recorder())


@pytest.mark.parametrize(("kind", "lora"), [("tts-grpo", False), ("tts-diffro", False), ("tts-grpo+diffro", False),
                                           ("tts-grpo+diffro", True)])
def test_cosyvoice2_llm_trains_through_the_services(cosyvoice2_stack: tuple[Stack, OriginalLLM], tmp_path: Path,
                                                    redis_server: RedisServer, speech: Any, kind: str,
                                                    lora: bool) -> None:
    """CosyVoice2's LLM, converted from llm.pt, as the policy: speakers given as prompt audio (what the
    cosyvoice2 token2wav backend renders with; espeak ignores it, the speaker reward compares with it), two
    steps move the weights and the rollout version, and the trained folder exported back to llm.pt is a
    CosyVoice2 LLM whose greedy synthesis is the served policy's. Under LoRA (DiffRO's gradient through the
    adapters) the rollout service samples base + adapters, and the checkpoint's merged model is what exports;
    the LoRA case runs last, on a service that still serves the earlier cases' full updates, which the job's
    first push of its base replaces (an adapter on another base would sample another policy)."""
    stack, original = cosyvoice2_stack
    prompts = ",".join(str(speech.path("This is how I sound.", voice)) for voice in ("en-us", "en-gb+f3"))
    out = tmp_path / kind
    with RolloutClient(stack.endpoints["rollout"]) as rollout:
        before = rollout.get_service_status().policy_version
    recorder = Recorder()
    adapters = {"lora": True, "lora_r": 4, "lora_alpha": 8} if lora else {}
    run_job(kind, job(stack, out, redis_server.url, kind, {"prompt_audio": prompts}, diffro_filter=False, **adapters),
            recorder)
    for _, metrics in recorder.steps:
        for key in ("reward/intelligibility", "reward/speaker", "reward/duration", "reward_mean", "sim", "loss"):
            assert math.isfinite(metrics[key]), (key, metrics.get(key))
        assert metrics["render_failures"] == 0 and metrics["completion_tokens"] > 0
    (assert_lora_merged if lora else assert_most_weights_moved)(stack.policy, out, "step-000002")

    trained = export_llm(out / "checkpoints" / "step-000002" / "policy", tmp_path / "llm.pt")
    exported = load_original(trained, len(VOCABULARY))  # strict: every tensor of Qwen2LM, nothing else
    reference = original.state_dict()
    assert any(not torch.equal(tensor, reference[name]) for name, tensor in exported.state_dict().items())
    layout = CosyVoice2Layout.load(stack.policy)
    texts = [r["text"] for r in read_corpus(stack.corpus, "train")[:2]]
    with RolloutClient(stack.endpoints["rollout"]) as rollout:
        assert rollout.get_service_status().policy_version == before + (4 if lora else 3)
        served = rollout.generate([layout.prompt_ids(t) for t in texts], n=1, max_tokens=24, temperature=0.0,
                                  speech_token_range=layout.speech_range())
    for text, result in zip(texts, served, strict=True):
        assert layout.speech_tokens(result.unwrap()[0].token_ids) == exported.greedy(layout.text_ids(text), 24)


@pytest.mark.parametrize("kind", ["tts-grpo", "tts-diffro", "tts-grpo+diffro"])
def test_cosyvoice2_llm_and_token2wav_train_together(whole_cosyvoice2_stack: Stack, tmp_path: Path,
                                                     redis_server: RedisServer, speech: Any, kind: str) -> None:
    """The paper's TTS setting end to end on a tiny CosyVoice2: the LLM samples CosyVoice2 speech tokens, the
    cosyvoice2 token2wav backend renders them in the voice of the job's prompt audio (it refuses an item
    without one, so no render failure means every item carried its prompt), Whisper and the speaker model
    score that audio, and two steps of each kind move the weights with the rollout version in step."""
    stack = whole_cosyvoice2_stack
    prompts = ",".join(str(speech.path("This is how I sound.", voice)) for voice in ("en-us", "en-gb+f3"))
    with RolloutClient(stack.endpoints["rollout"]) as rollout:
        before = rollout.get_service_status().policy_version
    recorder = Recorder()
    run_job(kind, job(stack, tmp_path, redis_server.url, kind, {"prompt_audio": prompts}, diffro_filter=False,
                      max_completion_length=24), recorder)
    assert [s for s, _ in recorder.steps] == [1, 2]
    for _, metrics in recorder.steps:
        assert metrics["render_failures"] == 0 and metrics["completion_tokens"] > 0
        for key in ("reward/intelligibility", "reward/speaker", "reward/duration", "reward_mean", "sim", "loss"):
            assert math.isfinite(metrics[key]), (key, metrics.get(key))
    assert_most_weights_moved(stack.policy, tmp_path, "step-000002")
    with RolloutClient(stack.endpoints["rollout"]) as rollout:
        assert rollout.get_service_status().policy_version == before + 3

"""TRL's GRPOTrainer trains two steps with the speech rewards against the real scorers (TRL 1.16).

A TTS policy's completions become audio through the real token2wav service (espeak-phonemes: the
policy's token ids taken as phoneme ids), and two reward functions score that audio: the
intelligibility scorer (Whisper tiny.en) against the row's text, and the speaker scorer
(Resemblyzer) against the row's reference voice. What TRL logged must equal what the scorers answer
for the same audio, asked directly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from speechrl.adapters.trl import IntelligibilityReward, SpeakerSimilarityReward
from speechrl.client import IntelligibilityClient, SpeakerClient, Token2WavClient
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.speaker.server import SpeakerConfig
from speechrl.services.speaker.server import start as start_speaker
from speechrl.services.token2wav.server import Token2WavConfig
from speechrl.services.token2wav.server import start as start_token2wav
from speechrl.services.token2wav.tokens import PhonemeVocabulary
from tests.support.servers import Speech, serve_in_thread

TEXTS = ["turn on the kitchen lights", "call my sister tomorrow"]


@pytest.fixture(scope="module")
def scorers() -> Iterator[dict[str, str]]:
    with serve_in_thread(lambda: start_token2wav(Token2WavConfig(port=free_port()))) as t2w, \
            serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as asr, \
            serve_in_thread(lambda: start_speaker(SpeakerConfig(port=free_port()))) as spk:
        yield {"token2wav": f"127.0.0.1:{t2w.port}", "intelligibility": f"127.0.0.1:{asr.port}",
               "speaker": f"127.0.0.1:{spk.port}"}


class PhonemeRenderer:
    """to_audio for a TTS policy: its completion ids as phoneme ids, rendered by the token2wav service.

    Keeps every audio it made, by completion ids, so the test can score the same audio directly.
    """

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.vocabulary = len(PhonemeVocabulary())
        self.made: dict[tuple[int, ...], bytes] = {}
        self.calls: list[dict[str, Any]] = []  # per call: the completions' ids and the dataset columns
        self._lock = threading.Lock()  # TRL runs sync to_audio in worker threads

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 **columns: Any) -> list[bytes | None]:
        keys = [tuple(ids) for ids in completion_ids]
        with Token2WavClient(self.endpoint, timeout_s=120) as client:
            results = client.synthesize([[i % self.vocabulary for i in ids] or [1] for ids in completion_ids])
        with self._lock:
            self.calls.append({"ids": keys, **columns})
            for key, result in zip(keys, results, strict=True):
                if result.wav is not None:
                    self.made[key] = result.wav
        return [r.wav for r in results]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5's renames, called from inside TRL
def test_grpo_trainer_logs_the_speech_scorers_rewards(scorers: dict[str, str], speech: Speech,
                                                      tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from speechrl.services.rollout.tiny import build_tiny_qwen2

    voices = {"en-us": speech.wav("This is the voice to copy.", "en-us"),
              "en-gb": speech.wav("This is the voice to copy.", "en-gb+f3")}
    rows = [{"prompt": f"say: {text}", "reference": text, "reference_audio": voices[voice]}
            for text, voice in zip(TEXTS, voices, strict=True)]
    renderer = PhonemeRenderer(scorers["token2wav"])
    intelligibility = IntelligibilityReward(scorers["intelligibility"], to_audio=renderer, language_column=None,
                                            reward_mapping="one_minus_wer")
    similarity = SpeakerSimilarityReward(scorers["speaker"], to_audio=renderer)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=12, max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                      log_completions=False, temperature=1.0)
    trainer = GRPOTrainer(model=build_tiny_qwen2(tmp_path / "policy", hidden_size=64, num_layers=1),
                          reward_funcs=[intelligibility, similarity], args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()

    steps = [h for h in trainer.state.log_history if "rewards/intelligibility/mean" in h]
    assert len(steps) == 2 and len(renderer.calls) == 4  # two reward functions a step
    with IntelligibilityClient(scorers["intelligibility"], timeout_s=120) as asr, \
            SpeakerClient(scorers["speaker"], timeout_s=120) as spk:
        for step, logged in enumerate(steps):
            first, second = renderer.calls[2 * step], renderer.calls[2 * step + 1]
            assert first["ids"] == second["ids"]  # both rewards scored the same completions
            wavs = [renderer.made[key] for key in first["ids"]]
            asr_rewards = [r.reward for r in asr.score(wavs, first["reference"], reward_mapping="one_minus_wer")]
            cosines = [r.reward for r in spk.score(wavs, first["reference_audio"])]
            assert logged["rewards/intelligibility/mean"] == pytest.approx(float(np.mean(asr_rewards)), abs=1e-6)
            assert logged["rewards/speaker_similarity/mean"] == pytest.approx(float(np.mean(cosines)), abs=1e-6)
    # The scores are real: the rendered babble resembles the reference voices to different degrees.
    assert len({round(float(v), 6) for v in trainer._logs["rewards"]["speaker_similarity"]}) >= 2

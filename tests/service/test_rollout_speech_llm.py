"""The rollout service on a speech LLM's own text decoder (Qwen3-ASR, Qwen2-Audio), fed the encoder service's
embeddings: its greedy completion and the first token's logprob equal the library model's own generate()
and forward on the same audio and text. Tiny random checkpoints in the libraries' format, loaded by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speechrl.client import AudioEncoderClient, RolloutClient
from speechrl.services.encoder.server import EncoderConfig
from speechrl.services.encoder.server import start as start_encoder
from speechrl.services.ports import free_port
from speechrl.services.rollout.server import RolloutConfig
from speechrl.services.rollout.server import start as start_rollout
from tests.support.servers import serve_in_thread
from tests.support.speech_llm import BUILDERS, audio_token_id, library_inputs

SUFFIX = [5, 6]  # text after the audio (an instruction), as token ids
NEW_TOKENS = 4


def library_greedy_and_logprob(folder: Path, clip: np.ndarray, count: int) -> tuple[list[int], float]:
    """The library's greedy tokens for [audio x count] + SUFFIX, and the first one's log-probability."""
    model, inputs = library_inputs(folder, clip, [audio_token_id(folder)] * count + SUFFIX)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]  # [V]
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    first = int(out[0, inputs["input_ids"].shape[1]])
    assert first == int(logits.argmax())
    return out[0, inputs["input_ids"].shape[1]:].tolist(), float(torch.log_softmax(logits.float(), -1)[first])


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_rollout_samples_the_checkpoints_own_decoder(family: str, tmp_path: Path) -> None:
    folder = BUILDERS[family](tmp_path / family)
    clip = np.random.default_rng(0).standard_normal(int(16_000 * 2.5)).astype(np.float32) * 0.1
    encoder = EncoderConfig(port=free_port(), backend="speech-llm", model_path=str(folder), threads=1)
    rollout = RolloutConfig(port=free_port(), model_path=str(folder), threads=1, max_wait_ms=2)
    with serve_in_thread(lambda: start_encoder(encoder)) as enc, serve_in_thread(lambda: start_rollout(rollout)) as gen, \
            AudioEncoderClient(f"127.0.0.1:{enc.port}") as encoder_client, \
            RolloutClient(f"127.0.0.1:{gen.port}") as rollout_client:
        [embeddings] = [np.asarray(r.unwrap()) for r in encoder_client.encode([(clip, 16_000)])]
        [result] = rollout_client.generate([embeddings], n=1, temperature=0.0, max_tokens=NEW_TOKENS,
                                           suffix_token_ids=SUFFIX)
        [sample] = result.unwrap()
    tokens, first_logprob = library_greedy_and_logprob(folder, clip, embeddings.shape[0])
    assert list(sample.token_ids[:len(tokens)]) == tokens[:len(sample.token_ids)] and sample.token_ids
    assert float(sample.logprobs[0]) == pytest.approx(first_logprob, abs=1e-4)

"""The LLM-TTS warm start (recipes/tts_warmstart.py): a tiny one end to end, and the voice it learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from speechrl.services.token2wav.tokens import VOCABULARY, VOICE_TOKENS
from speechrl.trainer.jobs.datasets import read_corpus
from speechrl.trainer.jobs.tts import Prompt
from speechrl.trainer.models.tts_policy import TtsPolicy
from speechrl.trainer.recipes.reproduce_tts import prompt_voice_probability
from speechrl.trainer.recipes.tts_warmstart import TtsWarmStartConfig, run_tts_warmstart


@pytest.mark.slow
def test_the_warm_start_speaks_a_voice_token_first_drawn_from_all_of_them(tmp_path: Path) -> None:
    """Every target begins with a voice token drawn uniformly, so the policy's first speech token is a voice
    token, spread over all of them whatever the text: a voice that knows nothing of the prompt speaker,
    which the TTS reproduction's SIM reward then has to find."""
    summary = run_tts_warmstart(TtsWarmStartConfig(out=str(tmp_path), train=6, dev=2, test=0, hidden_size=64,
                                                   num_layers=1, steps=60, batch_size=6, learning_rate=1e-2,
                                                   threads=1))
    assert json.loads((tmp_path / "warmstart.json").read_text())["dev_token_accuracy"] == summary["dev_token_accuracy"]
    policy = TtsPolicy.load(summary["policy"])
    begin, _ = policy.layout.speech_range()
    voices = [begin + VOCABULARY.index(t) for t in VOICE_TOKENS]
    texts = [r["text"] for r in read_corpus(summary["corpus"], "train")]
    prompts = [policy.layout.prompt_ids(text) for text in texts]
    with torch.no_grad():
        first = [torch.softmax(policy.model(input_ids=torch.tensor([p])).logits[0, -1], -1) for p in prompts]
    for probs in first:  # [V] the first speech token's distribution after each prompt
        assert probs[voices].sum() > 0.9, probs[voices]
        assert (probs[voices] > 0.1).all(), probs[voices]  # uniform would be 0.25 each
    # The reproduction's P(prompt voice) column: the probability of the prompt voice's own voice token.
    m7 = voices[VOICE_TOKENS.index("+m7")]
    assert prompt_voice_probability(summary["policy"], [Prompt(t, "en-us+m7") for t in texts]) == pytest.approx(
        float(torch.stack([probs[m7] for probs in first]).mean()), abs=1e-5)
    assert math.isnan(prompt_voice_probability(summary["policy"], [Prompt(texts[0], "en-gb")]))

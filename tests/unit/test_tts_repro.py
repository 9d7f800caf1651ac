"""The TTS reproduction's pieces that need no service: the warm start's targets (voice tokens, noise),
the systems' reward weights and the table over seeds."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from speechrl.services.token2wav.tokens import PHONEMES, SPOKEN, VOCABULARY, VOICE_TOKENS
from speechrl.trainer.recipes.reporting import over_seeds
from speechrl.trainer.recipes.reproduce_tts import (
    BASELINE,
    SYSTEMS,
    TtsReproConfig,
    markdown_table,
    reward_weights,
    run_label,
)
from speechrl.trainer.recipes.tts_warmstart import corrupt, noisy_target, voice_ids


def test_corrupt_substitutes_phonemes_only() -> None:
    """A substituted token is a phoneme: never a boundary, a stress mark or a voice token (a voice token in
    the middle of a target would change the voice the rest is spoken in)."""
    out = corrupt(list(range(len(SPOKEN))) * 50, random.Random(0), substitute=1.0, drop=0.0)
    assert {VOCABULARY[t] for t in out} == set(PHONEMES)


def test_a_warm_start_target_begins_with_a_voice_drawn_uniformly() -> None:
    voices = voice_ids(",".join(VOICE_TOKENS))
    rng = random.Random(0)
    targets = [noisy_target([5, 6, 7], rng, 0.0, 0.0, voices) for _ in range(4000)]
    assert all(t[1:] == [5, 6, 7] for t in targets)
    counts = Counter(VOCABULARY[t[0]] for t in targets)
    assert set(counts) == set(VOICE_TOKENS) and min(counts.values()) > 900  # ~1000 each
    assert noisy_target([5, 6, 7], rng, 0.0, 0.0) == [5, 6, 7]
    with pytest.raises(ValueError, match="not among tokens.VOICE_TOKENS"):
        voice_ids("+m1,+f9")


def test_the_sim_reward_is_off_only_where_a_system_says_so() -> None:
    config = TtsReproConfig(sim_weight=0.7)
    speaker = {name: reward_weights(config, name)["speaker"] for name in SYSTEMS}
    assert speaker == {"GRPO": 0.7, "GRPO (no SIM reward)": 0.0, "DiffRO": 0.0, "GRPO+DiffRO (no filter)": 0.7,
                       "GRPO+DiffRO (filter)": 0.7}
    assert reward_weights(config, "GRPO (no SIM reward)")["intelligibility"] == 1.0
    assert reward_weights(config, "DiffRO")["intelligibility"] == 0.0
    with pytest.raises(ValueError, match=r"systems \['GRPO\+SIM'\] are not among"):
        TtsReproConfig(systems="GRPO,GRPO+SIM")
    with pytest.raises(ValueError, match="seeds"):
        TtsReproConfig(seeds="0,0")


def test_the_table_gives_each_system_its_mean_and_spread_over_seeds() -> None:
    table = {BASELINE: {"wer": 0.7, "sim": 0.74, "prompt_voice": 0.25, "speech_tokens": 42.0}}
    for seed, (wer, sim) in enumerate([(0.6, 0.80), (0.7, 0.90)]):
        table[run_label("GRPO", seed)] = {"wer": wer, "sim": sim, "prompt_voice": 0.5, "speech_tokens": 40.0}
    ceiling = {"wer": 0.3, "sim": 0.9, "prompt_voice": math.nan, "speech_tokens": 45.0}
    summary = {"GRPO": over_seeds([table[run_label("GRPO", s)] for s in (0, 1)])}
    text = markdown_table(table, summary, 12.5, {"GRPO, seed 0": 60.0, "token2reward": "reused"}, ceiling, cpu=20.1)
    assert "| warm start (baseline) | 0.700 | 0.740 | 0.250 | 42.000 |" in text
    assert "| GRPO | 0.650 ± 0.071 | 0.850 ± 0.071 | 0.500 ± 0.000 | 40.000 ± 0.000 |" in text  # sample std of 2 runs
    assert "| GRPO, seed 1 | 0.700 | 0.900 | 0.500 | 40.000 |" in text
    assert "| (ceiling: espeak's own phonemes) | 0.300 | 0.900 | - | 45.000 |" in text
    assert "| GRPO, seed 0 | 1.0 min |" in text
    assert "Whole run: 12.5 min. CPU time (this process and its services): 20.1 min." in text

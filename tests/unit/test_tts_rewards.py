"""TTS rewards on crafted groups: duration, token diversity, F0 spread (issue 7)."""

from __future__ import annotations

import numpy as np
import pytest

from speechrl.rewards import diversity_rewards, duration_rewards, edit_distance, f0_std, f0_track


def test_duration_is_zero_at_the_median_and_scaled_by_it() -> None:
    assert duration_rewards([8, 10, 10, 12, 20]) == pytest.approx([-0.2, 0.0, 0.0, -0.2, -1.0])
    assert duration_rewards([2.0, 4.0]) == pytest.approx([-1 / 3, -1 / 3])  # median 3.0 of an even group
    assert duration_rewards([0, 0]) == [0.0, 0.0]
    assert duration_rewards([]) == []


def test_edit_distance_matches_hand_counts() -> None:
    assert edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], []) == 3
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 4, 3]) == 1  # one substitution
    assert edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 2  # delete 1, insert 5
    assert edit_distance([5, 6], [1, 2, 3, 4]) == 4


def test_diversity_identical_group_is_zero_and_the_odd_one_out_is_highest() -> None:
    assert diversity_rewards([[1, 2, 3]] * 4) == [0.0] * 4
    same, other = [1, 2, 3, 4], [7, 8, 9, 10]
    rewards = diversity_rewards([same, same, same, other])
    assert rewards == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert diversity_rewards([[1, 2]]) == [0.0]
    assert all(0.0 <= r <= 1.0 for r in diversity_rewards([[1], [1, 2, 3], [], [4, 5]]))


def _tone(f0: np.ndarray, sample_rate: int) -> np.ndarray:
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    return 0.5 * np.sin(phase) + 0.25 * np.sin(2 * phase)  # a harmonic, like a voiced vowel


def test_f0_tracker_finds_a_steady_pitch_and_its_spread() -> None:
    sr = 16000
    steady = _tone(np.full(sr, 150.0), sr)
    track = f0_track(steady, sr)
    assert len(track) > 50
    assert np.median(track) == pytest.approx(150.0, rel=0.02)
    flat = f0_std(steady, sr)
    assert flat is not None and flat < 2.0

    glide = _tone(np.linspace(100.0, 250.0, sr), sr)  # a rising glide: a wide spread
    spread = f0_std(glide, sr)
    assert spread is not None and 30.0 < spread < 60.0  # std of a uniform 100..250 Hz is ~43 Hz


def test_f0_of_silence_and_noise_is_unscored() -> None:
    sr = 16000
    assert f0_std(np.zeros(sr), sr) is None
    noise = np.random.default_rng(0).normal(size=sr)
    assert f0_std(noise, sr) is None or len(f0_track(noise, sr)) < 0.1 * len(f0_track(_tone(np.full(sr, 150.0), sr), sr))
    assert f0_std(np.zeros(10), sr) is None

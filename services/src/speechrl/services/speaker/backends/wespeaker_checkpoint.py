"""wespeaker checkpoints (config.yaml + avg_model.pt), built and run with wespeaker's own model classes.

The layout is wespeaker's: what its hub releases and `wespeaker.cli.speaker.load_model_pt` read.
config.yaml is the training config (`model`, `model_args`, `dataset_args`); avg_model.pt is a plain
state_dict as `wespeaker.utils.checkpoint.save_checkpoint` writes it (wespeaker/bin/average_model.py
averages those). `--model-path` names the folder, or a .pt file whose config.yaml lies beside it or
one folder up (a training run's exp_dir/models/avg_model.pt next to exp_dir/config.yaml).

The network is `wespeaker.models.speaker_model.get_speaker_model(config["model"])(**model_args)`,
the call wespeaker's CLI and bin/extract.py make. Features follow config.yaml as bin/extract.py
applies it: dataset_args.resample_rate, dataset_args.fbank_args (dither off), CMN unless
dataset_args.cmvn is false. Only the fbank front-end is supported (not s3prl / whisper front-ends).
Settings that wespeaker's CLI sets in code rather than in config.yaml (a povey window on samples
in [-1, 1] for the CAM++ / ERes2Net models converted from 3D-Speaker) are not applied: such a folder
needs window_type and normalize_samples added to its fbank_args.

Two things differ from wespeaker's own loading, on purpose:

* its `load_checkpoint` loads with strict=False and only logs missing tensors, so a checkpoint of
  another architecture would serve random weights, and random weights give real-looking low
  scores. Here every tensor of the network must come from the file; only `projection.*` (the
  training loss head, e.g. ArcMargin, which the averaged checkpoint still holds) may be extra.
* it unpickles with weights_only=False; here only tensors and plain containers are read.

The wheel is `wespeaker-unofficial` (upstream's source; scripts/bootstrap.sh installs it --no-deps).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
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
    "the wespeaker-checkpoint backend needs the `wespeaker` Python package: install it with "
    "`pip install --no-deps wespeaker-unofficial==0.0.2` (as scripts/bootstrap.sh does; its declared "
    "dependencies are not needed here), or export the checkpoint with wespeaker/bin/export_onnx.py and "
    "serve it with --backend wespeaker-onnx"
)
CHECKPOINT_NAME = "avg_model.pt"  # what wespeaker's hub folders and load_model_pt hold
CONFIG_NAME = "config.yaml"
# Keys of the training loss head (wespeaker's train.py adds it as model.projection); not used to embed.
PROJECTION_PREFIX = "projection."

# Package __init__ files that only re-export optional parts: `wespeaker/__init__.py` imports the CLI
# (torchaudio, silero-vad, umap-learn, hdbscan, s3prl, whisper), and `wespeaker/frontend/__init__.py`
# the self-supervised front-ends (s3prl, whisper, transformers + peft), which redimnet2.py reaches
# through `wespeaker.frontend.tfmel`. The model modules themselves need torch, numpy and scipy only;
# torchaudio does not load beside our torch pin.
_SKIPPED_INITS = ("wespeaker", "wespeaker.frontend")


def _package_without_init(name: str) -> None:
    """Put package `name` into sys.modules with its search path but without running its __init__.py."""
    if name in sys.modules:
        return  # already imported (fully, or by an earlier call): leave it as it is
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(f"no package named {name!r}", name=name)
    package = importlib.util.module_from_spec(spec)  # __path__ set, body not executed
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, package)


def import_wespeaker() -> Callable[[str], Any]:
    """wespeaker's `get_speaker_model`, imported without its CLI; RuntimeError with INSTALL_HINT when absent.

    After this call `import wespeaker.models.resnet` (or any other model module) works too.
    """
    try:
        for name in _SKIPPED_INITS:
            _package_without_init(name)
        module = importlib.import_module("wespeaker.models.speaker_model")
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({exc})") from exc
    get_speaker_model: Callable[[str], Any] = module.get_speaker_model
    return get_speaker_model


def checkpoint_files(model_path: str) -> tuple[Path, Path]:
    """(config.yaml, checkpoint) of a model folder or checkpoint file; FileNotFoundError naming what is missing."""
    path = Path(model_path)
    if not model_path:
        raise FileNotFoundError(
            "the wespeaker-checkpoint backend needs --model-path: a wespeaker model folder "
            f"with {CONFIG_NAME} and {CHECKPOINT_NAME}"
        )
    if path.is_dir():
        checkpoint, configs = path / CHECKPOINT_NAME, [path / CONFIG_NAME]
    else:
        checkpoint, configs = path, [path.parent / CONFIG_NAME, path.parent.parent / CONFIG_NAME]
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"wespeaker checkpoint {checkpoint} not found (--model-path {model_path!r} "
            f"should be a folder with {CONFIG_NAME} and {CHECKPOINT_NAME})"
        )
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        raise FileNotFoundError(f"wespeaker config {configs[0]} not found (next to {checkpoint.name})")
    return config, checkpoint


def fbank_settings(config: Mapping[str, Any], source: str = CONFIG_NAME) -> FbankSettings:
    """Feature settings from a wespeaker config.yaml, as its bin/extract.py applies them.

    fbank_args and resample_rate sit under dataset_args (feature_args in older configs); CMN is on
    unless dataset_args.cmvn is false. Variance normalisation and a mel count that differs from
    model_args.feat_dim are refused: the model would get features it was not trained on.
    """
    dataset = config.get("dataset_args") or config.get("feature_args") or {}
    meta: dict[str, Any] = dict(dataset.get("fbank_args") or {})
    meta.setdefault("resample_rate", dataset.get("resample_rate"))
    feat_dim = (config.get("model_args") or {}).get("feat_dim")
    meta.setdefault("feat_dim", feat_dim)
    cmvn_args = dataset.get("cmvn_args") or {}
    if dataset.get("cmvn", True) and cmvn_args.get("norm_var", False):
        raise ValueError(f"{source}: cmvn_args.norm_var is set; only mean normalisation is supported here")
    cmn = bool(dataset.get("cmvn", True)) and bool(cmvn_args.get("norm_mean", True))
    settings = FbankSettings.from_metadata(meta)
    if feat_dim is not None and int(feat_dim) != settings.num_mel_bins:
        raise ValueError(
            f"{source}: fbank_args.num_mel_bins={settings.num_mel_bins} but model_args.feat_dim={feat_dim}"
        )
    return replace(settings, cmn=cmn)


def build_network(config: Mapping[str, Any], source: Path) -> Any:
    """The untrained network that config.yaml describes, built by wespeaker's get_speaker_model."""
    get_speaker_model = import_wespeaker()
    name = config.get("model")
    args = config.get("model_args") or {}
    frontend = (config.get("dataset_args") or {}).get("frontend", "fbank")
    if frontend != "fbank":
        raise ValueError(f"{source}: front-end {frontend!r} is not supported here; only fbank models")
    try:
        model_class = get_speaker_model(str(name))
    except (SystemExit, AttributeError) as exc:  # exit(1) for an unknown family, AttributeError for a size
        raise ValueError(f"{source}: wespeaker has no speaker model {name!r}") from exc
    try:
        return model_class(**args)
    except TypeError as exc:
        raise ValueError(f"{source}: model_args do not fit wespeaker's {name}: {exc}") from exc


def load_weights(network: Any, checkpoint: Path) -> None:
    """Fill every tensor of the network from a wespeaker checkpoint; ValueError naming the file otherwise."""
    import torch

    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all of them mean "unreadable"
        raise ValueError(f"wespeaker checkpoint {checkpoint} cannot be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]  # the wrapped form wespeaker's load_checkpoint also accepts
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"wespeaker checkpoint {checkpoint} holds no state_dict of tensors")
    weights = {k: v for k, v in state.items() if not k.startswith(PROJECTION_PREFIX)}
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"wespeaker checkpoint {checkpoint} does not fit the model in its config: {exc}") from exc


class WespeakerCheckpointBackend:
    """A wespeaker model folder loaded with wespeaker's own model classes.

    Usage (tests/service/test_speaker_backends.py serves a tiny random ResNet34 this way)::

        backend = WespeakerCheckpointBackend("voxceleb_resnet34/")  # config.yaml + avg_model.pt
        backend.embed([wav_16k]).shape  # (1, 256)
    """

    name = "wespeaker-checkpoint"

    def __init__(self, model_path: str = "", device: str = "cpu", threads: int = 0):
        import torch

        config_path, checkpoint = checkpoint_files(model_path)
        config = yaml.safe_load(config_path.read_text())
        if not isinstance(config, Mapping):
            raise ValueError(f"{config_path} is not a wespeaker config (no mapping at its top level)")
        self.features = fbank_settings(config, str(config_path))
        set_torch_threads(threads)
        self.torch = torch
        self.device = torch_device(device)
        self.network = build_network(config, config_path)
        load_weights(self.network, checkpoint)
        self.network.eval()  # on the CPU until load_to_device (under the GPU lease when there is one)
        self.residency = TorchResidency(lambda: [self.network], self.device)
        self.model = f"{checkpoint} ({config['model']})"
        self.sample_rate = self.features.sample_rate
        self.min_seconds = min_fbank_samples(self.features, MIN_FBANK_FRAMES) / self.sample_rate
        probe = np.zeros((1, 2 * MIN_FBANK_FRAMES, self.features.num_mel_bins), dtype=np.float32)
        self.dim = int(self._forward(probe).shape[-1])

    def _forward(self, feats: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.network(self.torch.from_numpy(feats).to(module_device(self.network)))  # [G, T, F] -> [G, D]
            out = out[-1] if isinstance(out, tuple) else out  # (embed_a, embed_b): wespeaker's CLI takes the last
        return out.float().cpu().numpy()

    def load_to_device(self) -> None:
        """Move the network to the configured device."""
        self.residency.load_to_device()

    def offload(self, mode: str) -> None:
        """Move the network to CPU memory (both modes)."""
        self.residency.offload(mode)

    def fbank(self, wav: np.ndarray) -> np.ndarray:
        """The model's input features of one waveform, [T, F], as config.yaml sets them."""
        return kaldi_fbank(wav, self.features)

    def embed(self, audios: list[np.ndarray]) -> np.ndarray:
        """[N, D] float32 unit rows; one forward per distinct frame count in the batch."""
        return l2_normalize(run_grouped_by_length([self.fbank(wav) for wav in audios], self._forward))

"""A tiny random wespeaker model, built and saved by wespeaker's own code, in its checkpoint layout.

The folder holds what a wespeaker training run leaves (and its hub releases ship): config.yaml,
the training config, and avg_model.pt, a plain state_dict written by
`wespeaker.utils.checkpoint.save_checkpoint` from the speaker model with the training loss head
attached as `projection` (wespeaker/bin/train.py's `model.add_module("projection", ...)`).

The network is config["model"] (ResNet34 by default) taken straight from `wespeaker.models.resnet`,
not through `get_speaker_model`, which the backend uses; 32 mel bins and a 16-dim embedding keep it cheap.
The fbank settings are deliberately not wespeaker's defaults (30 ms frames every 12 ms), so a
backend that ignored config.yaml would compute other features and other embeddings.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from speechrl.services.speaker.backends.wespeaker_checkpoint import import_wespeaker

FEAT_DIM = 32
EMBED_DIM = 16

# The shape of wespeaker's examples/voxceleb/v2/conf/resnet.yaml, cut down; some training-only keys
# (exp_dir, projection_args, loss, optimizer) stay in, as they do in a released config.yaml.
CONFIG: dict[str, Any] = {
    "exp_dir": "exp/ResNet34-TSTP-emb16-fbank32-tiny",
    "num_avg": 10,
    "dataset_args": {
        "resample_rate": 16000,
        "speed_perturb": True,
        "num_frms": 200,
        "fbank_args": {"num_mel_bins": FEAT_DIM, "frame_shift": 12, "frame_length": 30, "dither": 1.0},
        "spec_aug": False,
    },
    "model": "ResNet34",
    "model_init": None,
    "model_args": {"feat_dim": FEAT_DIM, "embed_dim": EMBED_DIM, "pooling_func": "TSTP", "two_emb_layer": False},
    "projection_args": {"project_type": "arc_margin", "scale": 32.0, "easy_margin": False},
    "loss": "CrossEntropyLoss",
    "optimizer": "SGD",
}
NUM_SPEAKERS = 7  # rows of the loss head; speed perturbation triples them, as train.py does


def build_tiny_wespeaker(folder: Path, seed: int = 0, config: dict[str, Any] | None = None) -> nn.Module:
    """Write config.yaml and avg_model.pt into folder; returns the network in eval mode (the reference)."""
    import_wespeaker()  # lets `wespeaker.models.*` import without wespeaker's CLI (and so without torchaudio)
    from wespeaker.models import resnet
    from wespeaker.models.projections import get_projection
    from wespeaker.utils.checkpoint import save_checkpoint

    config = copy.deepcopy(config or CONFIG)
    torch.manual_seed(seed)
    network: Any = getattr(resnet, config["model"])(**config["model_args"])  # wespeaker's modules are untyped
    with torch.no_grad():  # random, non-trivial batch-norm statistics, so eval mode matters
        for bn in (m for m in network.modules() if isinstance(m, nn.BatchNorm2d)):
            assert bn.running_mean is not None and bn.running_var is not None  # wespeaker tracks them
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    network.eval()
    center_embeddings(network, config["model_args"]["feat_dim"])
    projection_args = {
        **config["projection_args"],
        "embed_dim": config["model_args"]["embed_dim"],
        "num_class": 3 * NUM_SPEAKERS,
    }
    network.add_module("projection", get_projection(projection_args))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint(network, str(folder / "avg_model.pt"))
    return network


def center_embeddings(network: Any, feat_dim: int) -> None:
    """Set the embedding layer's bias so that noise embeds near zero.

    A random network maps every utterance to nearly the same direction (cosines of 0.98 to 0.998
    between the tests' four espeak clips), because the pooled statistics share a large positive part;
    a result paired with the wrong item would then score almost right. Centred, the same clips
    give cosines of about 0.56 to 0.98.
    """
    noise = 3.0 * torch.randn(4, 200, feat_dim, generator=torch.Generator().manual_seed(1))  # [B, T, F]
    pooled: list[torch.Tensor] = []
    hook = network.seg_1.register_forward_hook(lambda _m, args, _out: pooled.append(args[0]))
    with torch.no_grad():
        try:
            network(noise)
        finally:
            hook.remove()
        stats = pooled[0].mean(dim=0)  # [S]: TSTP statistics, the input of seg_1
        network.seg_1.bias.copy_(-network.seg_1.weight @ stats)  # [D]

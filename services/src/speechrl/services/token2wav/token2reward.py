"""Token2Reward (DiffRO, arXiv 2507.05911): an ASR model that reads speech tokens, not audio.

Its input layer is an embedding table over the K speech-token ids, so it reads either hard ids
(a row lookup) or a distribution over them (probs @ table: DiffRO's Gumbel-Softmax tokens); a
one-hot distribution gives exactly the hard input. A small transformer encoder, each token
upsampled to `upsample` frames (CTC needs at least as many frames as characters, and text has
more characters than a phoneme-like token sequence has tokens), and a CTC head over characters:

    log P(text | tokens) = -CTC(log_softmax(head(encoder(upsample(embed(tokens))))), text)

DiffRO's reward R (differentiable in the token distribution; speechrl.trainer.core.diffro) and the
token2wav service's ScoreTokens (hard ids: a cheap reward without rendering audio). Training is
the trainer's (speechrl.trainer.recipes.token2reward); the model lives here so the service can load it.

>>> model = Token2Reward(Token2RewardConfig(num_tokens=8, d_model=16, layers=1, heads=2)).eval()
>>> hard = model.log_prob_text(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool), ["ab"])
>>> soft = model.log_prob_text(F.one_hot(torch.tensor([[1, 2, 3]]), 8).float(), torch.ones(1, 3, dtype=torch.bool),
...                            ["ab"])
>>> torch.allclose(hard, soft, atol=1e-5)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # CTC classes 1..28; 0 is the blank
CHECKPOINT = "token2reward.pt"
# -log P of a text the frames cannot align to (CTC's +inf): a constant, so it carries no gradient, and
# far beyond the few hundred nats a model gives even a wrong sentence, so no real alignment scores below it.
IMPOSSIBLE = 1e4


def encode_text(text: str) -> list[int]:
    """Lower-cased characters of ALPHABET as class ids 1..len(ALPHABET); others dropped, spaces collapsed."""
    kept = "".join(c for c in text.lower() if c in ALPHABET)
    return [ALPHABET.index(c) + 1 for c in " ".join(kept.split())]


@dataclass(frozen=True)
class Token2RewardConfig:
    """Shape of the model; saved next to its weights."""

    num_tokens: int  # K: speech-token ids 0..K-1 (the policy's speech range, offset removed)
    d_model: int = 128  # width of the embedding and the encoder
    layers: int = 2  # transformer encoder layers
    heads: int = 4  # attention heads per layer
    upsample: int = 3  # CTC frames per speech token
    max_tokens: int = 512  # longest token sequence (learned positions)
    dropout: float = 0.1  # encoder dropout while training


class Token2Reward(nn.Module):
    """Speech tokens (ids [B, T] or distributions [B, T, K]) -> CTC log-probs over characters."""

    def __init__(self, config: Token2RewardConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embedding = nn.Parameter(torch.randn(config.num_tokens, d) / math.sqrt(d))  # [K, d] the input layer
        self.positions = nn.Parameter(torch.zeros(config.max_tokens * config.upsample, d))  # [T*U, d]
        self.expand = nn.Linear(d, d * config.upsample)  # each token -> U frames
        layer = nn.TransformerEncoderLayer(d, config.heads, 4 * d, config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, len(ALPHABET) + 1)  # [d] -> blank + characters

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """CTC log-probs [B, T*U, C] of tokens (ids [B, T] or probabilities [B, T, K]); mask [B, T] bool."""
        if tokens.dtype.is_floating_point:
            embedded = tokens.to(self.embedding.dtype) @ self.embedding  # [B, T, d] the soft path
        else:
            embedded = self.embedding[tokens.clamp(0, self.config.num_tokens - 1)]  # [B, T, d]
        batch, length, d = embedded.shape
        if length > self.config.max_tokens:
            raise ValueError(f"{length} tokens is more than max_tokens={self.config.max_tokens}")
        frames = self.expand(embedded).reshape(batch, length * self.config.upsample, d)  # [B, T*U, d]
        frames = frames + self.positions[: frames.shape[1]]  # [B, T*U, d]
        frame_mask = mask.bool().repeat_interleave(self.config.upsample, dim=1)  # [B, T*U]
        hidden = self.encoder(frames, src_key_padding_mask=~frame_mask)  # [B, T*U, d]
        return torch.log_softmax(self.head(hidden).float(), dim=-1)  # [B, T*U, C]

    def log_prob_text(self, tokens: Tensor, mask: Tensor, texts: Sequence[str]) -> Tensor:
        """log P(text_i | tokens_i) [B] by CTC, always finite, with a finite gradient.

        A text the frames cannot align to (more CTC frames needed than the tokens give; an empty
        token sequence gives none) scores -IMPOSSIBLE, a constant: no gradient, and far below what
        any real alignment scores, so stopping early can never raise R. Tokens must be left-aligned
        (mask a prefix of each row): CTC reads the first input_lengths frames.
        """
        mask = mask.bool()  # [B, T]
        # A row without tokens would be an all-padding row to attention (NaN out, NaN gradients
        # back): give it one dummy frame to run on; its CTC length stays 0.
        safe_mask = mask.clone()  # [B, T]
        safe_mask[:, 0] |= ~mask.any(1)
        log_probs = self(tokens, safe_mask)  # [B, T*U, C]
        targets = [torch.tensor(encode_text(t), dtype=torch.long) for t in texts]
        target_lengths = torch.tensor([len(t) for t in targets])  # [B]
        flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)  # [sum L]
        input_lengths = mask.sum(1).cpu() * self.config.upsample  # [B]
        # zero_infinity: CTC's gradient of an infinite loss is NaN, and NaN reaches every weight upstream.
        nll = F.ctc_loss(log_probs.transpose(0, 1), flat.to(log_probs.device), input_lengths, target_lengths,
                         blank=0, reduction="none", zero_infinity=True)  # [B]
        needed = torch.tensor([ctc_frames_needed(t) for t in targets])  # [B]
        impossible = (input_lengths < needed).to(nll.device)  # [B]
        return torch.where(impossible, torch.full_like(nll, -IMPOSSIBLE), -nll)  # [B]


def ctc_frames_needed(target: Sequence[int] | Tensor) -> int:
    """Fewest CTC frames that can emit target: one per label, plus a blank between equal neighbours.

    >>> ctc_frames_needed([1, 2, 2, 3])
    5
    """
    labels = [int(t) for t in target]
    return len(labels) + sum(a == b for a, b in zip(labels, labels[1:], strict=False))


def left_align(values: Tensor, mask: Tensor) -> Tensor:
    """Move each row's masked-in positions to its front, in order: [B, T, ...] by mask [B, T]."""
    order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)  # [B, T] real positions first
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


def save(model: Token2Reward, out: str | Path) -> Path:
    """Write config and weights to out/token2reward.pt; returns the file."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, path / CHECKPOINT)
    return path / CHECKPOINT


def load(path: str | Path, device: str | torch.device = "cpu") -> Token2Reward:
    """A saved model (a folder holding token2reward.pt, or the file), in eval mode."""
    file = Path(path)
    file = file / CHECKPOINT if file.is_dir() else file
    if not file.exists():
        raise FileNotFoundError(f"no Token2Reward checkpoint at {file}; train one with "
                                f"`python -m speechrl.trainer.recipes.token2reward --data pairs.jsonl --out DIR`")
    saved = torch.load(file, map_location=device, weights_only=True)
    model = Token2Reward(Token2RewardConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()


def pad(sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] and mask [B, T] (bool) of token sequences."""
    length = max((len(s) for s in sequences), default=0) or 1
    tokens = torch.zeros(len(sequences), length, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)  # [B, T]
    for i, sequence in enumerate(sequences):
        tokens[i, :len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[i, :len(sequence)] = True
    return tokens, mask

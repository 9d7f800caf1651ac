"""A small LLM-TTS policy, CosyVoice2-style: text tokens in, speech tokens from a reserved id range out.

The vocabulary is one id space (the layout): four specials, the words the policy was built with
(stored with the checkpoint in tts_layout.json; the warm-start recipe takes its corpus's words: a
word-level tokenizer keeps a tiny model's job a lookup per word rather than spelling), then the K speech tokens (espeak-ng phonemes, token2wav/tokens.py) at
[speech_offset, speech_offset + K):

    prompt      = w_1 ... w_n <speech>          the text, then "speak now"
    completion  = s_1 ... s_m <eos>             sampled only from the speech range + <eos>

The folder is a plain Qwen2 checkpoint (config.json, model.safetensors, generation_config.json)
with its tokenizer (tokenizer.json) and tts_layout.json, so the rollout service loads it like any
causal LM and samples it in SPEECH_TOKENS mode with speech_range(). Prompts go to it as token ids
(layout.prompt_ids): transformers 5's AutoTokenizer maps a qwen2 folder to Qwen2Tokenizer, which
rebuilds a BPE pipeline and does not read a word-level tokenizer.json (its eos / pad ids, all the
rollout service takes from it, are right); PreTrainedTokenizerFast.from_pretrained reads it as saved.

>>> import tempfile
>>> policy = TtsPolicy.build(TtsLayout(words=("hello", "world"), num_speech=5), hidden_size=64, num_layers=1)
>>> policy.layout.prompt_ids("Hello there world"), policy.layout.speech_range()
([4, 3, 5, 2], (6, 11))
>>> folder = policy.save(tempfile.mkdtemp())
>>> from transformers import PreTrainedTokenizerFast
>>> PreTrainedTokenizerFast.from_pretrained(folder)("hello world")["input_ids"]
[4, 5]

The same class holds CosyVoice2's LLM, converted from its llm.pt: its layout is CosyVoice2's
merged vocabulary, its model a CosyVoice2ForCausalLM (services/cosyvoice2.py); `load` tells them apart by
the layout file.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from speechrl.services.cosyvoice2 import CosyVoice2Layout, is_converted, load_causal_lm

SPECIALS = ("<pad>", "<eos>", "<speech>", "<unk>")
PAD_ID, EOS_ID, SPEECH_ID, UNK_ID = range(len(SPECIALS))
LAYOUT_FILE = "tts_layout.json"


def words_of(text: str) -> list[str]:
    """Lower-cased words of text, punctuation but apostrophes dropped ("O'clock." -> ["o'clock"])."""
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


@dataclass(frozen=True)
class TtsLayout:
    """Where text and speech sit in the policy's vocabulary."""

    words: tuple[str, ...]  # text vocabulary, ids len(SPECIALS) ..
    num_speech: int  # K speech tokens, ids speech_offset .. speech_offset + K - 1
    tokens_per_word: int = 8  # completion budget per word (espeak: ~4 phonemes + stress + boundary)

    @property
    def speech_offset(self) -> int:
        return len(SPECIALS) + len(self.words)

    @property
    def vocab_size(self) -> int:
        return self.speech_offset + self.num_speech

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def speech_range(self) -> tuple[int, int]:
        """[begin, end) of the speech ids: the rollout service's speech_token_range."""
        return self.speech_offset, self.vocab_size

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt of text: its word ids (<unk> for words outside the vocabulary), then <speech>."""
        return [self._word_ids.get(w, UNK_ID) for w in words_of(text)] + [SPEECH_ID]

    @functools.cached_property
    def _word_ids(self) -> dict[str, int]:
        """Word -> id, built once per layout (prompt_ids runs for every prompt of every step)."""
        return {w: i for i, w in enumerate(self.words, start=len(SPECIALS))}

    def speech_tokens(self, completion: Sequence[int]) -> list[int]:
        """The 0-based speech tokens (token2wav's ids) of a completion; <eos> and other ids dropped."""
        return [t - self.speech_offset for t in completion if self.speech_offset <= t < self.vocab_size]

    def max_new_tokens(self, text: str) -> int:
        """Completion budget of text: tokens_per_word per word, plus a little, so a loop cannot run long."""
        return self.tokens_per_word * len(words_of(text)) + 8

    @classmethod
    def load(cls, folder: str | Path) -> TtsLayout:
        """The layout of a policy folder (its tts_layout.json), without loading the model."""
        path = Path(folder) / LAYOUT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{folder} has no {LAYOUT_FILE}: not a TtsPolicy folder (TtsPolicy.save writes one)")
        values = json.loads(path.read_text())
        return cls(words=tuple(values.pop("words")), **values)

    def save(self, folder: str | Path) -> None:
        """Write the layout file and its word-level tokenizer into folder."""
        build_tokenizer(self).save_pretrained(folder)
        Path(folder, LAYOUT_FILE).write_text(json.dumps(asdict(self)) + "\n")

    def token_strings(self) -> list[str]:
        """Every id's string, in id order (the tokenizer's vocabulary)."""
        return [*SPECIALS, *self.words, *(f"<|s_{i}|>" for i in range(self.num_speech))]


def build_tokenizer(layout: TtsLayout) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over layout's ids (lower-cased, whitespace-split, <unk> for the rest)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(layout.token_strings())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class SpeechLayout(Protocol):
    """What the TTS job and its trainer read of a policy's vocabulary (TtsLayout, CosyVoice2Layout)."""

    @property
    def speech_offset(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def prompt_ids(self, text: str) -> list[int]: ...
    def speech_range(self) -> tuple[int, int]: ...
    def speech_tokens(self, completion: Sequence[int]) -> list[int]: ...
    def max_new_tokens(self, text: str) -> int: ...
    def save(self, folder: str | Path) -> None: ...


class TtsPolicy:
    """The causal LM and its layout."""

    def __init__(self, model: Qwen2ForCausalLM, layout: SpeechLayout):
        self.model = model
        self.layout = layout

    @classmethod
    def build(cls, layout: TtsLayout, *, hidden_size: int = 128, num_layers: int = 2, head_dim: int = 64,
              max_positions: int = 512, seed: int = 0) -> TtsPolicy:
        """A randomly initialised Qwen2 over layout's vocabulary (built from a config: no hub here)."""
        if hidden_size % head_dim:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of head_dim {head_dim}")
        heads = hidden_size // head_dim
        config = Qwen2Config(vocab_size=layout.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max_positions, tie_word_embeddings=False,
                             use_sliding_window=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
        torch.manual_seed(seed)
        return cls(Qwen2ForCausalLM(config), layout)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> TtsPolicy:
        """A TtsPolicy.save folder or a converted CosyVoice2 LLM (models/cosyvoice2.py import_llm)."""
        layout: SpeechLayout = CosyVoice2Layout.load(folder) if is_converted(folder) else TtsLayout.load(folder)
        model: Any = load_causal_lm(folder, torch.float32)
        return cls(model.to(device), layout)

    def save(self, folder: str | Path) -> str:
        """Write the checkpoint folder (model, tokenizer, generation config, layout); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.layout.save(folder)
        GenerationConfig(eos_token_id=self.layout.eos_id, pad_token_id=self.layout.pad_id).save_pretrained(folder)
        return str(folder)

    def sequences(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forcing batch of prompt + completion (speech ids 0-based, <eos> appended).

        Returns ids [B, L], attention mask [B, L] and labels [B, L] (-100 on prompt and padding).
        """
        layout = self.layout
        rows = [(list(p), [t + layout.speech_offset for t in c] + [layout.eos_id]) for p, c in zip(
            prompts, completions, strict=True)]
        length = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), length), layout.pad_id, dtype=torch.long)  # [B, L]
        labels = torch.full((len(rows), length), -100, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(rows), length, dtype=torch.long)  # [B, L]
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
            mask[i, :len(p) + len(c)] = 1
        return ids, mask, labels

"""CosyVoice2's LLM as a transformers causal LM: llm.pt <-> a CosyVoice2ForCausalLM folder, and its ids' layout.

CosyVoice2's llm.pt (cosyvoice/llm/llm.py Qwen2LM's state dict) holds, for K speech tokens (6561):

    llm.model.*                Qwen2ForCausalLM: text embedding [T, D], layers, norm, text head (unused)
    llm_embedding.weight       [2, D]      sos (0), task_id (1)
    speech_embedding.weight    [K + 3, D]  speech tokens, eos (K), two fill tokens (K + 1, K + 2)
    llm_decoder.weight / bias  [K + 3, D] / [K + 3]  the speech head

and synthesises by [sos, text embeddings, task_id] -> speech tokens from softmax(llm_decoder(h)).
The converted folder is one Qwen2 over the merged vocabulary, text then speech then sos / task_id,
as the CosyVoice GRPO recipe's converter lays it out, but with every tensor kept:

    ids [0, T)                  text: embedding rows, head rows = the text head, bias MASKED_LOGIT
    ids [T, T + K + 3)          speech, eos, fills: speech_embedding, llm_decoder (its bias too)
    ids T + K + 3, T + K + 4    sos, task_id: llm_embedding, head rows 0, bias MASKED_LOGIT

so the converted model's distribution is CosyVoice2's exactly, and `export_llm` gives llm.pt back
tensor for tensor (a tied text head comes back as the trained text embedding, as CosyVoice ties it).
The rollout service samples speech tokens and eos (generation_config's eos is K's id): the two fill
tokens, which only CosyVoice2's bistream synthesis emits on purpose and its unistream one stops on,
are never sampled.
The text is tokenised by the checkpoint's own CosyVoice-BlankEN tokenizer with CosyVoice2's special
tokens added (its frontend's); the prompt carries no speaker: the speaker comes from token2wav's
prompt audio, as in the GRPO recipe.

    speechrl cosyvoice2 import /models/CosyVoice2-0.5B /models/cosyvoice2-llm   # then train it
    speechrl cosyvoice2 export runs/tts/step-000100/policy /models/CosyVoice2-0.5B/llm.pt

The head has a bias (llm_decoder's), which transformers' Qwen2ForCausalLM lacks: the GRPO recipe's
converter writes one anyway and it is dropped on load, so the model it trains is not CosyVoice2's.
CosyVoice2ForCausalLM is Qwen2ForCausalLM with the biased head, named as CosyVoice's own vLLM class is
(rollout/backends/vllm_cosyvoice2.py registers it with vLLM); config.json says model_type qwen2,
`architectures: ["CosyVoice2ForCausalLM"]`. Load such a folder with `load_causal_lm` (the rollout
service and the trainer do): AutoModelForCausalLM would build a plain Qwen2 and drop the bias with
only a warning.

>>> import tempfile
>>> from transformers import Qwen2Config
>>> config = Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
...                      num_attention_heads=1, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
>>> folder = tempfile.mkdtemp()
>>> CosyVoice2ForCausalLM(config).save_pretrained(folder)
>>> type(load_causal_lm(folder)).__name__, is_cosyvoice2(folder)
('CosyVoice2ForCausalLM', True)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

ARCHITECTURE = "CosyVoice2ForCausalLM"
# The head bias of ids CosyVoice2 cannot emit (text, sos, task_id): their probability underflows to 0
# exactly, as if the head had no such rows. Finite, not -inf: entropy's sum of p * logit would be
# 0 * -inf = NaN, and a temperature division would overflow the float32 minimum to -inf.
MASKED_LOGIT = -1e9


class CosyVoice2ForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM whose lm_head has a bias (CosyVoice2's llm_decoder rows carry one)."""

    _tied_weights_keys: Any = {}  # the head is never the embedding: it has a bias and other rows

    def __init__(self, config: Any):
        if config.tie_word_embeddings:
            raise ValueError("CosyVoice2ForCausalLM needs tie_word_embeddings=False: its head has a bias")
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()


def is_cosyvoice2(folder: str | Path) -> bool:
    """Whether folder is a CosyVoice2ForCausalLM checkpoint (its config.json's architectures)."""
    path = Path(folder, "config.json")
    return path.is_file() and ARCHITECTURE in (json.loads(path.read_text()).get("architectures") or [])


def load_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """The causal LM of a checkpoint folder: CosyVoice2ForCausalLM where its config names it, else AutoModelForCausalLM."""
    model_class: Any = CosyVoice2ForCausalLM if is_cosyvoice2(folder) else AutoModelForCausalLM
    return model_class.from_pretrained(str(folder), dtype=dtype, **kwargs)


LAYOUT_FILE = "cosyvoice2_layout.json"
TEXT_FOLDER = "CosyVoice-BlankEN"  # the Qwen2 config and tokenizer CosyVoice2's Qwen2Encoder loads
# The special tokens CosyVoice2's frontend adds to the Qwen tokenizer (cosyvoice/tokenizer get_qwen_tokenizer).
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
                  "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
                  "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]")
LLM_KEYS = ("llm_embedding.weight", "speech_embedding.weight", "llm_decoder.weight", "llm_decoder.bias",
            "llm.model.model.embed_tokens.weight")
TEXT_EMBEDDING, TEXT_HEAD = "llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"


@dataclass(frozen=True)
class CosyVoice2Layout:
    """Where text, speech and CosyVoice2's specials sit in the merged vocabulary."""

    text_rows: int  # T: the text embedding's rows (the Qwen2 vocabulary, padding included)
    num_speech: int  # K: speech tokens, ids [T, T + K)
    text_head_tied: bool  # whether llm.pt's text head was its text embedding
    tokens_per_text_token: int = 20  # completion budget per text token (CosyVoice2's max_token_text_ratio)
    tokenizer: Any = field(default=None, compare=False, repr=False)

    @property
    def speech_offset(self) -> int:
        return self.text_rows

    @property
    def eos_id(self) -> int:
        return self.text_rows + self.num_speech

    @property
    def pad_id(self) -> int:  # padding is masked out: any id will do
        return self.eos_id

    @property
    def sos_id(self) -> int:
        return self.text_rows + self.num_speech + 3

    @property
    def task_id(self) -> int:
        return self.sos_id + 1

    @property
    def vocab_size(self) -> int:
        return self.task_id + 1

    def speech_range(self) -> tuple[int, int]:
        """[begin, end) of the speech ids: the rollout service's speech_token_range."""
        return self.text_rows, self.text_rows + self.num_speech

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, text: str) -> list[int]:
        """CosyVoice2's LLM input for text: sos, the text's tokens, task_id."""
        return [self.sos_id, *self.text_ids(text), self.task_id]

    def speech_tokens(self, completion: Any) -> list[int]:
        """The 0-based speech tokens (token2wav's ids) of a completion; eos and other ids dropped."""
        begin, end = self.speech_range()
        return [t - begin for t in completion if begin <= t < end]

    def max_new_tokens(self, text: str) -> int:
        return self.tokens_per_text_token * max(1, len(self.text_ids(text)))

    def save(self, folder: str | Path) -> None:
        """Write the layout file and the tokenizer into folder."""
        self.tokenizer.save_pretrained(folder)
        values = {k: v for k, v in asdict(self).items() if k != "tokenizer"}
        Path(folder, LAYOUT_FILE).write_text(json.dumps(values) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> CosyVoice2Layout:
        """The layout of a converted folder, with its tokenizer."""
        values = json.loads(Path(folder, LAYOUT_FILE).read_text())
        return cls(**values, tokenizer=AutoTokenizer.from_pretrained(str(folder)))


def is_converted(folder: str | Path) -> bool:
    return Path(folder, LAYOUT_FILE).is_file()


def _read_llm_pt(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a CosyVoice2 folder holds llm.pt")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}  # training checkpoints add epoch, step
    missing = [k for k in LLM_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} is not a CosyVoice2 llm.pt (Qwen2LM): it lacks {missing}")
    unknown = [k for k in state if not k.startswith("llm.model.") and k not in LLM_KEYS]
    if unknown:  # nothing may be dropped on the way: export_llm must give every tensor back
        raise ValueError(f"{path} has tensors a CosyVoice2 Qwen2LM does not: {unknown[:5]}")
    return state


def import_llm(source: str | Path, out: str | Path) -> str:
    """Convert a CosyVoice2 folder's llm.pt (and CosyVoice-BlankEN/) into a CosyVoice2ForCausalLM folder at out."""
    source, out = Path(source), Path(out)
    text_folder = source / TEXT_FOLDER
    if not (text_folder / "config.json").is_file():
        raise FileNotFoundError(f"{text_folder} has no config.json: a CosyVoice2 folder holds {TEXT_FOLDER}/")
    state = _read_llm_pt(source / "llm.pt")
    text = state.pop(TEXT_EMBEDDING)  # [T, D]
    text_head = state.pop(TEXT_HEAD, text)  # [T, D]
    speech, specials = state.pop("speech_embedding.weight"), state.pop("llm_embedding.weight")  # [K + 3, D], [2, D]
    head, bias = state.pop("llm_decoder.weight"), state.pop("llm_decoder.bias")  # [K + 3, D], [K + 3]
    tokenizer = AutoTokenizer.from_pretrained(str(text_folder))
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    layout = CosyVoice2Layout(text_rows=text.shape[0], num_speech=speech.shape[0] - 3,
                              text_head_tied=text_head is text or torch.equal(text_head, text), tokenizer=tokenizer)
    masked = torch.full((), MASKED_LOGIT, dtype=bias.dtype)
    tensors = {k.removeprefix("llm.model."): v.contiguous() for k, v in state.items()}
    tensors["model.embed_tokens.weight"] = torch.cat([text, speech, specials])  # [V, D]
    tensors["lm_head.weight"] = torch.cat([text_head, head, torch.zeros_like(specials)])  # [V, D]
    tensors["lm_head.bias"] = torch.cat([masked.expand(layout.text_rows), bias, masked.expand(2)])  # [V]

    if len(tokenizer) > layout.text_rows:
        raise ValueError(f"{text_folder}'s tokenizer has {len(tokenizer)} tokens with CosyVoice2's specials, more "
                         f"than the {layout.text_rows} text embedding rows of llm.pt")
    config = Qwen2Config.from_pretrained(str(text_folder))
    config.vocab_size, config.tie_word_embeddings, config.architectures = layout.vocab_size, False, [ARCHITECTURE]
    config.eos_token_id, config.bos_token_id, config.pad_token_id = layout.eos_id, None, layout.pad_id
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig(eos_token_id=layout.eos_id, pad_token_id=layout.pad_id).save_pretrained(out)
    layout.save(out)
    return str(out)


def export_llm(folder: str | Path, out: str | Path) -> str:
    """Write a converted (or trained) folder back as CosyVoice2's llm.pt at out; returns out."""
    layout = CosyVoice2Layout.load(folder)
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors file to export")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    embedding, head, bias = tensors.pop("model.embed_tokens.weight"), tensors.pop("lm_head.weight"), \
        tensors.pop("lm_head.bias")
    t, speech_end = layout.text_rows, layout.eos_id + 3
    state = {f"llm.model.{k}": v for k, v in tensors.items()}
    state[TEXT_EMBEDDING] = embedding[:t].clone()
    state[TEXT_HEAD] = state[TEXT_EMBEDDING] if layout.text_head_tied else head[:t].clone()
    state["speech_embedding.weight"] = embedding[t:speech_end].clone()
    state["llm_embedding.weight"] = embedding[speech_end:speech_end + 2].clone()
    state["llm_decoder.weight"], state["llm_decoder.bias"] = head[t:speech_end].clone(), bias[t:speech_end].clone()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return str(out)


def main(argv: list[str] | None = None) -> None:
    """speechrl cosyvoice2 import SOURCE OUT | export FOLDER LLM_PT"""
    parser = argparse.ArgumentParser(prog="speechrl cosyvoice2", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_folder = commands.add_parser("import", help="CosyVoice2 folder (llm.pt, CosyVoice-BlankEN/) -> a policy folder")
    to_folder.add_argument("source")
    to_folder.add_argument("out")
    to_pt = commands.add_parser("export", help="policy folder (converted or trained) -> CosyVoice2's llm.pt")
    to_pt.add_argument("folder")
    to_pt.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "import":
        print(import_llm(args.source, args.out))
    else:
        print(export_llm(args.folder, args.out))

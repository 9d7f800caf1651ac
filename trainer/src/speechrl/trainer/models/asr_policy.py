"""The small LLM-ASR policy: a frozen audio front-end feeding a trainable causal LM.

The front-end (speechrl.services.encoder: Whisper encoder + adaptor, by default tiny.en in
CTranslate2) turns 16 kHz audio into embeddings [T, D] in the LM's input space. The LM is a
Qwen2ForCausalLM built from a config, with a byte-level BPE tokenizer trained offline on the
training sentences (Qwen2's own pipeline, so transformers and vLLM load the folder as a Qwen2
checkpoint).

The prompt layout, the one place it is defined (warm start, GRPO and the rollout service use it):

    position:  0 ........ T-1 | T ........ T+I-1      | T+I ....... T+I+N-1 | T+I+N
    input:     audio a_1..a_T | instruction ids i_1..I | transcript y_1..y_N | EOS
    labels:    -100 ...       | -100 ...               | y_1 ... y_N         | EOS    (labels[t] = input token t;
                                                                                       the LM shifts them)

The prompt is the audio embeddings followed by the instruction's token embeddings (the LM's own
embedding table, so they train with it); the completion is the transcript then EOS. Positions
count from 0 at each row's first real position, so left padding (generation: the rollout
service's `embeddings` + `suffix_token_ids`) and right padding (training) give the same numbers.
A checkpoint folder holds the LM (save_pretrained), the tokenizer, `asr_layout.json`
(PromptLayout: instruction ids, EOS/pad, the front-end) and `frontend/` (the front-end's adaptor
files), so it is everything the encoder and rollout services need:

    speechrl serve encoder --backend ct2-whisper --model-path CKPT/frontend
    speechrl serve rollout --model-path CKPT        (prompts: embeddings + suffix_token_ids = instruction_ids)

The same class trains a real speech LLM (speechrl.services.speech_llm: Qwen3-ASR, Qwen2-Audio) from
its transformers checkpoint folder: the model is the checkpoint's text decoder, the layout is derived
from the family (its transcription prompt split around the audio: prefix ids, audio, suffix ids),
the encoder service serves the folder's own audio tower (`--backend speech-llm --model-path CKPT`),
and save writes the whole checkpoint back in the library's format:

    position:  0 ... P-1 | P ... P+T-1 | P+T ... P+T+I-1 | transcript | EOS
    input:     prefix    | audio        | suffix (instruction_ids)     | y_1..y_N   | EOS
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from speechrl.services.encoder.ct2 import (
    CT2_SETTINGS,
    CT2EncoderSettings,
    bundled_whisper_path,
    load_ct2_encoder,
    resolve_whisper_path,
)
from speechrl.services.encoder.model import ADAPTOR_CONFIG, ADAPTOR_WEIGHTS, AudioEncoderModel, load_audio_encoder
from speechrl.services.speech_llm import (
    FAMILIES,
    SpeechLLM,
    asr_prompt_ids,
    family_of,
    is_speech_llm,
    load_speech_llm,
    load_speech_llm_encoder,
)

EOS_TOKEN = "<|endoftext|>"  # Qwen2's end-of-text token
PAD_TOKEN = "<|pad|>"
INSTRUCTION_TOKEN = "<|transcribe|>"  # the instruction: one special token, "transcribe this audio"
LAYOUT_FILE = "asr_layout.json"
FRONTEND_DIR = "frontend"
IGNORE_INDEX = -100  # labels that the loss skips (HF's convention)


class AroundAudio(TypedDict):
    """The rollout client's keyword arguments for the token ids around each embeddings prompt."""

    prefix_token_ids: list[int]
    suffix_token_ids: list[int]


@dataclass(frozen=True)
class PromptLayout:
    """asr_layout.json: how prompts are built for a checkpoint, and which front-end feeds it."""

    instruction_ids: tuple[int, ...]  # the token ids after the audio embeddings
    eos_token_id: int  # ends every transcript
    pad_token_id: int
    hidden_size: int  # D: the width the front-end's embeddings must have
    embeddings_per_second: float  # audio embeddings per second of audio (12.5 for Whisper with k = 4)
    frontend_backend: str = "ct2-whisper"  # the encoder service's --backend
    frontend_path: str = FRONTEND_DIR  # the front-end folder, relative to the checkpoint
    max_tokens_per_second: float = 8.0  # generation budget: espeak's fastest speech is ~3.5 tokens/s
    prefix_ids: tuple[int, ...] = ()  # token ids before the audio embeddings (a speech LLM's prompt head)
    transcript_prefix: str = " "  # put before a transcript when it is tokenised as a training target

    def max_new_tokens(self, num_embeddings: int) -> int:
        """Generation budget for a prompt of num_embeddings audio positions (room for runaway repeats)."""
        return math.ceil(num_embeddings / self.embeddings_per_second * self.max_tokens_per_second) + 8

    def token_ids_around_audio(self) -> AroundAudio:
        """The rollout client's keyword arguments that put this layout's ids around each embeddings prompt."""
        return {"prefix_token_ids": list(self.prefix_ids), "suffix_token_ids": list(self.instruction_ids)}

    def save(self, folder: str | Path) -> None:
        values = asdict(self)
        values["instruction_ids"] = list(self.instruction_ids)
        values["prefix_ids"] = list(self.prefix_ids)
        (Path(folder) / LAYOUT_FILE).write_text(json.dumps(values, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PromptLayout:
        """asr_layout.json of a folder AsrPolicy.save wrote, or the layout of a speech-LLM checkpoint folder."""
        if not (Path(folder) / LAYOUT_FILE).is_file() and is_speech_llm(folder):
            return cls.of_speech_llm(folder)
        values = json.loads((Path(folder) / LAYOUT_FILE).read_text())
        values["instruction_ids"] = tuple(values["instruction_ids"])
        values["prefix_ids"] = tuple(values.get("prefix_ids", ()))
        return cls(**values)

    @classmethod
    def of_speech_llm(cls, folder: str | Path, tokenizer: Any = None, prompt: str = "") -> PromptLayout:
        """The layout of a Qwen3-ASR / Qwen2-Audio checkpoint folder: prompt (by default its family's
        transcription prompt) around the audio, its tokenizer's EOS, its own audio tower in the encoder service."""
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(folder))
        prefix, suffix = asr_prompt_ids(folder, tokenizer, prompt)
        text_config = AutoConfig.from_pretrained(str(folder)).text_config
        eos = int(tokenizer.eos_token_id)
        return cls(instruction_ids=suffix, eos_token_id=eos,
                   pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos),
                   hidden_size=int(text_config.hidden_size),
                   embeddings_per_second=FAMILIES[family_of(folder)].embeddings_per_second,
                   frontend_backend="speech-llm", frontend_path=".", prefix_ids=prefix, transcript_prefix="")


@dataclass
class AsrBatch:
    """Model inputs in the prompt layout (module docstring), padded to one length L."""

    inputs_embeds: Tensor  # [B, L, D]
    attention_mask: Tensor  # [B, L] 1 on real positions
    position_ids: Tensor  # [B, L] 0 at each row's first real position
    labels: Tensor | None  # [B, L] completion ids at completion positions, IGNORE_INDEX elsewhere
    prompt_lengths: Tensor  # [B] P + T_i + I: prefix, audio and instruction positions

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the LM's forward (labels included when set)."""
        out = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
               "position_ids": self.position_ids}
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def asr_inputs(embed_tokens: nn.Module, audio: Sequence[Tensor], instruction_ids: Sequence[int],
               completions: Sequence[Sequence[int]] | None = None, *, padding_side: str = "right",
               prefix_ids: Sequence[int] = ()) -> AsrBatch:
    """Build [prefix][audio][instruction][completion] rows: the one implementation of the prompt layout.

    audio: per row [T_i, D] front-end embeddings; completions: per row token ids (transcript +
    EOS for training, sampled ids for scoring), or None for prompts only. embed_tokens is the LM's
    input embedding table, so instruction and completion embeddings carry gradients.

    >>> table = nn.Embedding(10, 4)
    >>> batch = asr_inputs(table, [torch.zeros(3, 4), torch.zeros(1, 4)], [7], [[1, 2], [3]])
    >>> batch.inputs_embeds.shape, batch.labels.tolist()
    (torch.Size([2, 6, 4]), [[-100, -100, -100, -100, 1, 2], [-100, -100, 3, -100, -100, -100]])
    >>> asr_inputs(table, [torch.zeros(3, 4), torch.zeros(1, 4)], [7], padding_side="left").position_ids.tolist()
    [[0, 1, 2, 3], [0, 0, 0, 1]]
    >>> asr_inputs(table, [torch.zeros(1, 4)], [7], [[1]], prefix_ids=[8, 9]).labels.tolist()
    [[-100, -100, -100, -100, 1]]
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    if completions is not None and len(completions) != len(audio):
        raise ValueError(f"{len(audio)} audio rows but {len(completions)} completions")
    weight = next(embed_tokens.parameters())
    device, dtype = weight.device, weight.dtype
    instruction = embed_tokens(torch.tensor(list(instruction_ids), dtype=torch.long, device=device))  # [I, D]
    prefix = embed_tokens(torch.tensor(list(prefix_ids), dtype=torch.long, device=device))  # [P, D]
    rows, labels = [], []
    for i, embeddings in enumerate(audio):
        parts = [prefix, embeddings.to(device, dtype), instruction]  # [P, D], [T_i, D], [I, D]
        prompt = len(prefix_ids) + embeddings.shape[0] + len(instruction_ids)
        ids = list(completions[i]) if completions is not None else []
        if ids:
            parts.append(embed_tokens(torch.tensor(ids, dtype=torch.long, device=device)))  # [N_i, D]
        rows.append(torch.cat(parts))  # [T_i + I + N_i, D]
        labels.append([IGNORE_INDEX] * prompt + ids)
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])  # [B, L, D]
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)  # [B, L]
    label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)  # [B, L]
    for i, row in enumerate(rows):
        span = slice(length - row.shape[0], length) if padding_side == "left" else slice(0, row.shape[0])
        embeds[i, span] = row
        mask[i, span] = 1
        label_tensor[i, span] = torch.tensor(labels[i], dtype=torch.long, device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # [B, L]
    prompt_lengths = torch.tensor([len(prefix_ids) + a.shape[0] + len(instruction_ids) for a in audio],
                                  device=device)  # [B]
    return AsrBatch(embeds, mask, positions, label_tensor if completions is not None else None, prompt_lengths)


# -- building and loading ----------------------------------------------------------------------


def build_asr_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE over texts with Qwen2's pipeline, plus EOS, pad and the instruction token.

    Qwen2's normaliser and split regex, so AutoTokenizer (which rebuilds a Qwen2Tokenizer around the
    saved vocab and merges for a qwen2 config) and vLLM tokenise exactly as this object does.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN, INSTRUCTION_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Transcripts follow the instruction directly, so train on " text": every word has its space prefix.
    backend.train_from_iterator([" " + t for t in texts], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[INSTRUCTION_TOKEN])


def build_asr_lm(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 256, num_layers: int = 4,
                 intermediate_size: int = 0, max_position_embeddings: int = 1024, seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2ForCausalLM for tokenizer's vocabulary; head dim 64 (vLLM's CPU attention has it)."""
    if hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (head dim 64), got {hidden_size}")
    heads = hidden_size // 64
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config._attn_implementation = "sdpa"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)


@dataclass
class AsrPolicy:
    """The trainable half of the LLM-ASR (LM + tokenizer + layout); the front-end is loaded apart."""

    model: Any  # a transformers causal LM (Qwen2ForCausalLM; a speech LLM's decoder, e.g. Qwen3ForCausalLM)
    tokenizer: Any
    layout: PromptLayout
    speech_llm: SpeechLLM | None = None  # the whole checkpoint when model is a speech LLM's decoder (save writes it)

    @classmethod
    def create(cls, tokenizer: PreTrainedTokenizerFast, model: Qwen2ForCausalLM, embeddings_per_second: float,
               frontend_backend: str = "ct2-whisper") -> AsrPolicy:
        instruction: Any = tokenizer.convert_tokens_to_ids(INSTRUCTION_TOKEN)
        layout = PromptLayout(instruction_ids=(int(instruction),), eos_token_id=int(tokenizer.eos_token_id),
                              pad_token_id=int(tokenizer.pad_token_id), hidden_size=int(model.config.hidden_size),
                              embeddings_per_second=embeddings_per_second, frontend_backend=frontend_backend)
        return cls(model, tokenizer, layout)

    def completion_ids(self, text: str) -> list[int]:
        """The training target of a transcript: its tokens (with the leading space) then EOS."""
        target = self.layout.transcript_prefix + text.strip()
        return [*self.tokenizer(target, add_special_tokens=False)["input_ids"], self.layout.eos_token_id]

    def inputs(self, audio: Sequence[Tensor], texts: Sequence[str] | None = None,
               padding_side: str = "right") -> AsrBatch:
        """asr_inputs with this policy's embedding table and instruction (targets from texts when given)."""
        completions = [self.completion_ids(t) for t in texts] if texts is not None else None
        return asr_inputs(self.model.get_input_embeddings(), audio, self.layout.instruction_ids, completions,
                          padding_side=padding_side, prefix_ids=self.layout.prefix_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    @torch.inference_mode()
    def transcribe(self, audio: Sequence[Tensor], max_new_tokens: Sequence[int] | None = None) -> list[str]:
        """Greedy transcripts of a batch of [T_i, D] embeddings (left-padded prompts, KV cache)."""
        budgets = list(max_new_tokens) if max_new_tokens is not None else \
            [self.layout.max_new_tokens(a.shape[0]) for a in audio]
        return [self.decode(ids) for ids in greedy_decode(self.model, self.inputs(audio, padding_side="left"),
                                                          budgets, self.layout.eos_token_id)]

    def save(self, folder: str | Path, frontend: str | Path | None = None) -> Path:
        """Write the checkpoint folder (module docstring); frontend's adaptor files go to folder/frontend.
        A speech LLM's is the whole checkpoint in the library's format (its audio half unchanged)."""
        if self.speech_llm is not None:
            return self.speech_llm.save(folder)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        GenerationConfig(eos_token_id=self.layout.eos_token_id, pad_token_id=self.layout.pad_token_id,
                         do_sample=False).save_pretrained(folder)
        self.layout.save(folder)
        if frontend is not None and Path(frontend).resolve() != (folder / FRONTEND_DIR).resolve():
            target = folder / FRONTEND_DIR
            target.mkdir(exist_ok=True)
            for name in (ADAPTOR_CONFIG, ADAPTOR_WEIGHTS, CT2_SETTINGS):
                if (Path(frontend) / name).exists():
                    shutil.copy(Path(frontend) / name, target / name)
            if self.layout.frontend_backend == "ct2-whisper":
                # The copy names its Whisper model by absolute path (unless it is the bundled tiny.en),
                # since a path relative to the original folder, or the folder itself, stays behind.
                settings = CT2EncoderSettings.load(frontend)
                whisper = resolve_whisper_path(Path(frontend), settings)
                if whisper != bundled_whisper_path():
                    replace(settings, whisper_model=str(whisper.resolve())).save(target)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> AsrPolicy:
        """A checkpoint folder written by save, or a speech-LLM checkpoint folder (the LM in float32 on device)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if is_speech_llm(folder):
            whole = load_speech_llm(folder, torch.float32, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            return cls(whole.decoder.to(device).eval(), tokenizer, PromptLayout.of_speech_llm(folder, tokenizer), whole)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        return cls(model.to(device).eval(), AutoTokenizer.from_pretrained(folder), PromptLayout.load(folder))


def load_frontend(checkpoint: str | Path, device: str = "cpu", threads: int = 0) -> AudioEncoderModel:
    """The audio front-end a checkpoint names (layout.frontend_backend / frontend_path)."""
    layout = PromptLayout.load(checkpoint)
    folder = Path(checkpoint) / layout.frontend_path
    if layout.frontend_backend == "speech-llm":
        return load_speech_llm_encoder(folder, device=device)
    if not (folder / ADAPTOR_CONFIG).exists():
        raise FileNotFoundError(f"{folder} has no {ADAPTOR_CONFIG}: the checkpoint was saved without its front-end")
    if layout.frontend_backend == "ct2-whisper":
        return load_ct2_encoder(folder, device=device, threads=threads)
    return load_audio_encoder(folder, device=device)


def greedy_decode(model: Any, batch: AsrBatch, max_new_tokens: Sequence[int], eos_token_id: int) -> list[list[int]]:
    """Greedy completions of a left-padded prompt batch, each row up to its own budget, EOS excluded."""
    forward = inspect.signature(type(model).forward).parameters
    cache_arg = "cache" if "cache" in forward else "past_key_values"  # transformers 5.24 renamed it
    cache = DynamicCache(config=model.config)
    mask = batch.attention_mask  # [B, L]
    logits = model(inputs_embeds=batch.inputs_embeds, attention_mask=mask, position_ids=batch.position_ids,
                   use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]  # [B, V]
    position = batch.position_ids[:, -1:] + 1  # [B, 1]
    out: list[list[int]] = [[] for _ in range(mask.shape[0])]
    done = [budget <= 0 for budget in max_new_tokens]
    for _ in range(max(max_new_tokens, default=0)):
        ids = logits.argmax(-1)  # [B]
        for row, token in enumerate(ids.tolist()):
            if done[row]:
                continue
            if token == eos_token_id:
                done[row] = True
            else:
                out[row].append(token)
                done[row] = len(out[row]) >= max_new_tokens[row]
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, L + step]
        logits = model(input_ids=ids[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                       **{cache_arg: cache}).logits[:, -1]  # [B, V]
        position = position + 1
    return out

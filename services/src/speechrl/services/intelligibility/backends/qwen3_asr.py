"""qwen3-asr backend: Qwen3-ASR (0.6B / 1.7B), a multilingual speech LLM, on transformers.

The folder is the library's own format, what `Qwen3ASRForConditionalGeneration.save_pretrained` writes
(config.json with model_type qwen3_asr, the weights, the feature extractor's preprocessor_config.json and
the tokenizer), e.g. a download of Qwen/Qwen3-ASR-0.6B-hf. The same folder is a policy elsewhere in the
project (speechrl.services.speech_llm), and the prompt, the placeholder count and the folder check are
that module's, so the reward model and the policy read one checkpoint format the same way.

A batch is one `generate` call: each utterance's log-mel features from the checkpoint's own extractor
(padded to the longest; the mask keeps the padding out of the tower), and its transcription prompt with
one audio placeholder per embedding the tower gives, left-padded. The prompt forces each item's language
("... assistant\\nlanguage Chinese<asr_text>", qwen3_asr_prompt), as qwen-asr does for a known
language, so the answer is the transcript alone; parse_transcript still drops a "language X<asr_text>"
header should the model write one, so the WER is on the transcript. The audio tower works in chunks of
2 * n_window mel frames with no 30 s window, so there is no long-form path: the engine's
max_audio_seconds is the only length limit. Decoding is greedy unless beam_size > 1.

The same model on vLLM is the qwen3-asr-vllm backend (qwen3_asr_vllm.py), which reads qwen-asr's own layout
instead and shares check_folder, language_prompts and parse_transcript with this one.

qwen-asr and transformers' own parser also collapse runs of 20+ repeated characters or phrases in the
answer; this backend does not: in a TTS reward a repeated phrase is the policy's error to pay for, and
the decode budget already bounds the ASR's own loops.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, Qwen3ASRForConditionalGeneration
from transformers.models.qwen3_asr.processing_qwen3_asr import LANGUAGE_CODE_TO_NAME

from speechrl.services.encoder.model import DTYPES
from speechrl.services.intelligibility.backends import BackendOptions, max_new_tokens
from speechrl.services.speech_llm import FAMILIES, family_of, prompt_ids_around_audio, qwen3_asr_prompt

log = logging.getLogger(__name__)

# "auto": full precision on CPU (half-precision matmuls are slow there); bfloat16 on GPU, the precision
# Qwen3-ASR is released in (Qwen3's activations can overflow float16).
AUTO_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}

ASR_TEXT = "<asr_text>"  # ends the header of a Qwen3-ASR answer: "language English<asr_text>transcript"
LANGUAGE_HEADER = "language "


def parse_transcript(raw: str) -> tuple[str | None, str]:
    """(the language the model named, the transcript) of a decoded Qwen3-ASR answer.

    An answer without the <asr_text> marker is all transcript (the forced-language case); "language
    None" is the model's word for no speech.

    >>> parse_transcript("language Chinese<asr_text>你好。")
    ('Chinese', '你好。')
    >>> parse_transcript(" The cat sat. ")
    (None, 'The cat sat.')
    >>> parse_transcript("language None<asr_text>")
    (None, '')
    """
    header, marker, text = raw.partition(ASR_TEXT)
    if not marker:
        return None, raw.strip()
    first = next((line.strip() for line in header.splitlines() if line.strip()), "")
    language = first[len(LANGUAGE_HEADER) :].strip() if first.lower().startswith(LANGUAGE_HEADER) else first
    return (None if language.lower() in ("", "none") else language), text.strip()


def check_folder(folder: str, backend: str, qwen_asr_layout: bool) -> None:
    """Refuse a folder that is not a Qwen3-ASR checkpoint in the layout backend reads: transformers' (the -hf
    conversions) when qwen_asr_layout is False, qwen-asr's own (thinker_config; the Qwen/Qwen3-ASR-1.7B
    repository) when True. Each engine would misread the other layout: transformers builds a default model beside
    its weights and answers garbage, which would read as a real low reward; vLLM 0.32 cannot map the -hf
    conversion's untied lm_head and needs the tokenizer to name its audio tokens."""
    examples = "Qwen/Qwen3-ASR-1.7B or -0.6B" if qwen_asr_layout else "Qwen/Qwen3-ASR-1.7B-hf or -0.6B-hf"
    if not folder or not Path(folder, "config.json").is_file():
        raise FileNotFoundError(
            f"the {backend} backend needs model_path: a Qwen3-ASR checkpoint folder with config.json "
            f"(e.g. {examples}), got {folder!r}"
        )
    if family_of(folder) != "qwen3_asr":
        raise ValueError(f"{folder}: the {backend} backend serves Qwen3-ASR checkpoints; this one is {family_of(folder)}")
    in_qwen_asr_layout = "thinker_config" in json.loads(Path(folder, "config.json").read_text())
    if in_qwen_asr_layout and not qwen_asr_layout:
        raise ValueError(
            f"{folder} is in qwen-asr's format (thinker_config); the {backend} backend reads transformers' format: "
            f"use the -hf checkpoint ({examples}), or serve this folder with --backend qwen3-asr-vllm"
        )
    if qwen_asr_layout and not in_qwen_asr_layout:
        raise ValueError(
            f"{folder} is in transformers' format (no thinker_config); the {backend} backend reads qwen-asr's "
            f"format: use the original checkpoint ({examples}), or serve this folder with --backend qwen3-asr"
        )


def language_prompts(tokenizer: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """ISO 639-1 code -> (prefix ids, suffix ids) around the audio of the transcription prompt that forces that
    language (qwen3_asr_prompt): only the suffix differs between languages."""
    return {
        code: prompt_ids_around_audio(qwen3_asr_prompt(name), tokenizer) for code, name in LANGUAGE_CODE_TO_NAME.items()
    }


class Qwen3AsrBackend:
    """Batched Qwen3-ASR decoding with transformers' Qwen3ASRForConditionalGeneration.

    >>> backend = Qwen3AsrBackend(BackendOptions(model_path="/models/Qwen3-ASR-0.6B-hf",
    ...                                          device="cuda:0"))  # doctest: +SKIP
    >>> backend.transcribe([np.zeros(16000, np.float32)], ["zh"])  # doctest: +SKIP
    ['']
    """

    name = "qwen3-asr"

    def __init__(self, options: BackendOptions):
        check_folder(options.model_path, self.name, qwen_asr_layout=False)
        self.model = options.model_path
        dtype_name = (
            AUTO_DTYPES[options.device.split(":")[0]] if options.compute_type == "auto" else options.compute_type
        )
        if dtype_name not in DTYPES:
            raise ValueError(
                f"compute_type {options.compute_type!r} is not a torch dtype for the qwen3-asr backend; "
                f"choose auto or one of {sorted(DTYPES)}"
            )
        if options.device.startswith("cpu"):
            # One intra-op pool sized to the cores: the batcher calls from a single thread.
            torch.set_num_threads(options.threads or os.cpu_count() or 1)
        self.device = torch.device(options.device)
        self.dtype = DTYPES[dtype_name]
        self.beam_size = options.beam_size
        loaded: Any = Qwen3ASRForConditionalGeneration.from_pretrained(
            self.model, dtype=self.dtype, output_loading_info=True
        )
        self._asr: Qwen3ASRForConditionalGeneration = loaded[0]
        unloaded = [*sorted(loaded[1]["missing_keys"]), *sorted(map(str, loaded[1]["mismatched_keys"]))]
        if unloaded:
            # from_pretrained leaves such weights random and only warns: every transcript would be noise.
            raise ValueError(
                f"{self.model}: weights missing or of the wrong shape for Qwen3ASRForConditionalGeneration "
                f"(not transformers' format?): {unloaded[:5]}"
            )
        module: torch.nn.Module = self._asr  # PreTrainedModel.to's functools.wraps hides its signature
        module.to(self.device).eval()
        self._features: Any = AutoFeatureExtractor.from_pretrained(self.model)
        self._tokenizer: Any = AutoTokenizer.from_pretrained(self.model)
        self.sample_rate: int = int(self._features.sampling_rate)
        self.languages = frozenset(LANGUAGE_CODE_TO_NAME)
        # (prefix ids, suffix ids) around the audio placeholders, per language: only the suffix differs.
        self._prompts = language_prompts(self._tokenizer)
        config = self._asr.config
        self._audio_token_id = int(config.audio_token_id)
        pad = self._tokenizer.pad_token_id
        self._pad_token_id = int(pad if pad is not None else self._tokenizer.eos_token_id)
        self._context = int(config.text_config.max_position_embeddings)
        log.info("qwen3-asr: %s on %s (%s)", self.model, self.device, dtype_name)

    def load_to_device(self) -> None:
        """Put the weights on the compute device (residency policy)."""
        module: torch.nn.Module = self._asr
        module.to(self.device)

    def offload(self, mode: str) -> None:
        """Move the weights to CPU memory between leased batches ("sleep" is the same for torch)."""
        if self.device.type == "cuda":
            module: torch.nn.Module = self._asr
            module.to("cpu")
            torch.cuda.empty_cache()

    def transcribe(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """Transcripts of 16 kHz mono float32 utterances in one generate call, each in its item's language."""
        return [parse_transcript(raw)[1] for raw in self.generate_raw(audios, languages)]

    @torch.inference_mode()
    def generate_raw(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """The decoded answers before parse_transcript, index-aligned with audios."""
        features = self._features(
            audios,
            sampling_rate=self.sample_rate,
            return_tensors="pt",
            return_attention_mask=True,
            padding="longest",
            truncation=False,
        )
        frames = features["attention_mask"]  # [B, F] 1 on valid mel frames
        counts = FAMILIES["qwen3_asr"].lengths(self._asr.model, frames.sum(-1)).tolist()  # embeddings per clip
        rows = []
        for count, language in zip(counts, languages, strict=True):
            prefix, suffix = self._prompts[language]
            rows.append([*prefix, *[self._audio_token_id] * int(count), *suffix])
        width = max(len(row) for row in rows)
        # Left padding: every row's answer starts at the same position, where generate appends.
        input_ids = torch.tensor([[self._pad_token_id] * (width - len(r)) + r for r in rows])  # [B, L]
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # [B, L]
        longest = max(audio.shape[0] for audio in audios) / self.sample_rate
        out = self._asr.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            input_features=features["input_features"].to(self.device, self.dtype),  # [B, mels, F]
            input_features_mask=frames.to(self.device),
            max_new_tokens=max_new_tokens(longest, self._context - width),
            num_beams=self.beam_size,
            do_sample=False,
        )
        if not isinstance(out, torch.Tensor):  # a GenerateOutput when the generation config asks for one
            out = out["sequences"]
        answers = out[:, width:]  # [B, N] the new tokens; pad after each row's end of sequence
        return [str(text) for text in self._tokenizer.batch_decode(answers, skip_special_tokens=True)]

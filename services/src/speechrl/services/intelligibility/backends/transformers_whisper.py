"""transformers backend: any Whisper checkpoint folder (e.g. a local copy of whisper-large-v3).

The folder is what `save_pretrained` writes (config, weights, generation_config.json, the
processor's feature extractor and tokenizer); nothing is fetched from a hub. Utterances of up to
30 s are decoded as one short-form `generate` batch (features padded to Whisper's 30 s window, as
in training); longer ones go through transformers' long-form algorithm (sequential 30 s windows
driven by timestamp tokens), batched among themselves. Decoding is greedy unless beam_size > 1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from speechrl.services.intelligibility.backends import WINDOW_SECONDS, BackendOptions, max_new_tokens

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# "auto": full precision on CPU (half-precision matmuls are slow there); float16 on GPU, the
# precision OpenAI released Whisper in.
AUTO_DTYPES = {"cpu": "float32", "cuda": "float16"}

# Start of transcript, language, task, no-timestamps: the longest prompt generate() prepends.
PROMPT_TOKENS = 4


class TransformersWhisperBackend:
    """Batched Whisper decoding with transformers' WhisperForConditionalGeneration.

    >>> backend = TransformersWhisperBackend(BackendOptions(model_path="/models/whisper-large-v3",
    ...                                                     device="cuda:0"))  # doctest: +SKIP
    >>> backend.transcribe([np.zeros(16000, np.float32)], ["en"])  # doctest: +SKIP
    ['']
    """

    name = "transformers"

    def __init__(self, options: BackendOptions):
        if not options.model_path or not Path(options.model_path, "config.json").is_file():
            raise FileNotFoundError(
                f"the transformers backend needs model_path: a Whisper checkpoint folder with config.json "
                f"(save_pretrained output), got {options.model_path!r}")
        self.model = options.model_path
        dtype_name = AUTO_DTYPES[options.device.split(":")[0]] if options.compute_type == "auto" else options.compute_type
        if dtype_name not in DTYPES:
            raise ValueError(f"compute_type {options.compute_type!r} is not a torch dtype for the transformers backend; "
                             f"choose auto or one of {sorted(DTYPES)}")
        if options.device.startswith("cpu"):
            # One intra-op pool sized to the cores: the batcher calls from a single thread.
            torch.set_num_threads(options.threads or os.cpu_count() or 1)
        self.device = torch.device(options.device)
        self.dtype = DTYPES[dtype_name]
        self.beam_size = options.beam_size
        self._processor = WhisperProcessor.from_pretrained(self.model)
        self._whisper = WhisperForConditionalGeneration.from_pretrained(self.model, dtype=self.dtype)
        module: torch.nn.Module = self._whisper  # PreTrainedModel.to's functools.wraps hides its signature
        module.to(self.device).eval()
        generation = self._whisper.generation_config
        self._multilingual = bool(getattr(generation, "is_multilingual", False))
        lang_to_id: dict[str, int] = getattr(generation, "lang_to_id", None) or {}
        self.languages = frozenset(k.strip("<|>") for k in lang_to_id) if self._multilingual else frozenset({"en"})
        self.sample_rate: int = self._processor.feature_extractor.sampling_rate
        self._token_limit = self._whisper.config.max_target_positions - PROMPT_TOKENS
        log.info("transformers Whisper: %s on %s (%s), multilingual=%s", self.model, self.device, dtype_name,
                 self._multilingual)

    def load_to_device(self) -> None:
        """Put the weights on the compute device (residency policy)."""
        module: torch.nn.Module = self._whisper
        module.to(self.device)

    def offload(self, mode: str) -> None:
        """Move the weights to CPU memory between leased batches ("sleep" is the same for torch)."""
        if self.device.type == "cuda":
            module: torch.nn.Module = self._whisper
            module.to("cpu")
            torch.cuda.empty_cache()

    def transcribe(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """Transcripts of 16 kHz mono float32 utterances; one generate call for all <= 30 s."""
        window = int(WINDOW_SECONDS * self.sample_rate)
        texts = [""] * len(audios)
        for long_form in (False, True):
            picked = [i for i, audio in enumerate(audios) if (audio.shape[0] > window) == long_form]
            if picked:
                batch = self._generate([audios[i] for i in picked], [languages[i] for i in picked], long_form)
                for i, text in zip(picked, batch, strict=True):
                    texts[i] = text
        return texts

    @torch.inference_mode()
    def _generate(self, audios: list[np.ndarray], languages: list[str], long_form: bool) -> list[str]:
        if long_form:
            # Unpadded features with a mask select transformers' sequential long-form decoding.
            inputs = self._processor.feature_extractor(audios, sampling_rate=self.sample_rate, return_tensors="pt",
                                                       truncation=False, padding="longest", return_attention_mask=True)
            longest = WINDOW_SECONDS
        else:
            inputs = self._processor.feature_extractor(audios, sampling_rate=self.sample_rate, return_tensors="pt")
            longest = max(audio.shape[0] for audio in audios) / self.sample_rate
        kwargs: dict[str, object] = {
            "input_features": inputs.input_features.to(self.device, self.dtype),  # [B, n_mels, frames]
            "num_beams": self.beam_size,
            "do_sample": False,
            # A total length, not max_new_tokens: checkpoints' generation_config sets max_length too,
            # and giving both makes transformers warn on every call.
            "max_length": PROMPT_TOKENS + max_new_tokens(longest, self._token_limit),
        }
        if long_form:
            kwargs.update(attention_mask=inputs.attention_mask.to(self.device), return_timestamps=True,
                          condition_on_prev_tokens=False)
        if self._multilingual:
            kwargs.update(language=languages, task="transcribe")
        sequences = self._whisper.generate(**kwargs)
        if not isinstance(sequences, torch.Tensor):  # long-form may answer a dict with "sequences"
            sequences = sequences["sequences"]
        return [text.strip() for text in self._processor.batch_decode(sequences, skip_special_tokens=True)]

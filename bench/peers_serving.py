"""What every peer server of bench/peers.py shares: SpeechRL's own engines behind plain item dicts.

A peer stack (PyTriton, Ray Serve, LitServe) hosts the very engine a `speechrl serve` process builds
(bench/scorers.py builds it the same way), so only the serving stack differs. An item is a plain
dict, as the gateway's JSON items name their fields, with audio as bytes:

- intelligibility: {"audio": WAV bytes, "reference_text": str}
- speaker: {"audio": WAV bytes, "reference_audio": WAV bytes}
- rules: {"hypothesis": str, "reference": str}

and a result is {"score": {field: value}} with the fields of COMPARED (the numbers every stack must
agree on), or {"error": {"code", "message"}}. Over HTTP the bodies are the gateway's own
(`{"items": [...]}` with `audio_base64` and `reference_audio: {"audio_base64"}`) and so are the replies
(`{"results": [...]}`), so one client drives the gateway, Ray Serve and LitServe alike.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

SCORER_NAMES = ("intelligibility", "speaker", "rules")
# The fields whose values every stack must return equal to SpeechRL's, per scorer, with the tolerance
# of the comparison (0: exactly equal, for text).
COMPARED: dict[str, dict[str, float]] = {
    "intelligibility": {"transcript": 0, "wer": 1e-6, "reward": 1e-6},
    "speaker": {"cosine": 1e-4, "reward": 1e-4},
    "rules": {"wer": 1e-6, "accuracy_reward": 1e-6, "hallucination_reward": 1e-6, "keyword_reward": 1e-6,
              "total": 1e-6},
}
AUDIO_FIELDS = {"intelligibility": ("audio",), "speaker": ("audio", "reference_audio"), "rules": ()}
TEXT_FIELDS = {"intelligibility": ("reference_text",), "speaker": (), "rules": ("hypothesis", "reference")}
# Every peer batches as the CosyVoice2 GRPO recipe's PyTriton server does (examples/grpo/cosyvoice2/
# token2wav_asr_server.py): at most 32 per batch, waiting at most 10 ms for company.
MAX_BATCH_SIZE = 32
MAX_WAIT_S = 0.010

Item = dict[str, Any]
Result = dict[str, Any]
BatchFn = Callable[[list[Item]], list[Result]]


def _summary(scorer: str, outcome: Any) -> Result:
    """The reply of one engine outcome: the compared fields of its score, or its error."""
    from speechrl.services.errors import ItemFailure

    if isinstance(outcome, ItemFailure):
        return {"error": {"code": outcome.code.value, "message": outcome.message}}
    if scorer == "intelligibility":
        return {"score": {"transcript": outcome.transcript, "wer": outcome.rates.wer, "reward": outcome.reward}}
    return {"score": {name: float(getattr(outcome, name)) for name in COMPARED[scorer]}}


def _engine_item(scorer: str, item: Item) -> Any:
    """The engine's own item, with every default the SpeechRL servicer leaves unset left to the engine."""
    from speechrl.services.audio import AudioInput

    if scorer == "intelligibility":
        from speechrl.services.intelligibility.engine import IntelligibilityItem

        return IntelligibilityItem(AudioInput(encoded=item["audio"]), item["reference_text"])
    if scorer == "speaker":
        from speechrl.services.speaker.engine import ScoreItem

        return ScoreItem(AudioInput(encoded=item["audio"]), AudioInput(encoded=item["reference_audio"]))
    from speechrl.services.rules.engine import RuleItem

    return RuleItem(item["hypothesis"], item["reference"])


def build(scorer: str, stack: str, report_dir: str) -> BatchFn:
    """The scorer's engine as its SpeechRL server builds it (and warms it), as a function of item dicts;
    records this process (pid: the settings check reads its environment and memory maps)."""
    from scorers import SCORERS

    process = SCORERS[scorer].build_engine([]).process  # build_engine([]): no benchmark items in the server

    def score(items: list[Item]) -> list[Result]:
        return [_summary(scorer, outcome) for outcome in process([_engine_item(scorer, i) for i in items])]

    Path(report_dir).mkdir(parents=True, exist_ok=True)
    (Path(report_dir) / f"{stack}-{scorer}.json").write_text(json.dumps({"pid": os.getpid(), "scorer": scorer}))
    return score


def from_json(scorer: str, item: Mapping[str, Any]) -> Item:
    """A plain item from one JSON item of the gateway's request schema (base64 audio)."""
    plain: Item = {name: item[name] for name in TEXT_FIELDS[scorer]}
    if scorer == "intelligibility":
        plain["audio"] = base64.b64decode(item["audio_base64"])
    elif scorer == "speaker":
        plain["audio"] = base64.b64decode(item["audio_base64"])
        plain["reference_audio"] = base64.b64decode(item["reference_audio"]["audio_base64"])
    return plain


def to_json(scorer: str, item: Item, b64: Callable[[bytes], str]) -> dict[str, Any]:
    """The gateway's JSON item of a plain item (what the HTTP clients send); b64: bytes to base64 text."""
    body: dict[str, Any] = {name: item[name] for name in TEXT_FIELDS[scorer]}
    if scorer in ("intelligibility", "speaker"):
        body["audio_base64"] = b64(item["audio"])
    if scorer == "speaker":
        body["reference_audio"] = {"audio_base64": b64(item["reference_audio"])}
    return body


def split(results: Sequence[Result], sizes: Sequence[int]) -> list[list[Result]]:
    """results of the concatenated requests, cut back into one list per request of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(list(results[start:start + size]))
        start += size
    return out

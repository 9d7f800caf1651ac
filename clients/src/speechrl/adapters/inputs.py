"""A trainer's values turned into the SDK's: completion text, speech tokens in decoded text, audio and
reference voices from dataset cells.

>>> parse_speech_tokens("<|s_12|><|s_7|> <|s_0|>")
[12, 7, 0]
>>> completion_text([{"role": "assistant", "content": "turn on the light"}])
'turn on the light'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from speechrl.client import AudioLike, SpeakerId

SPEECH_TOKEN = re.compile(r"<\|s_(\d+)\|>")
"""A CosyVoice-style speech token in decoded text, e.g. <|s_1234|>."""

SpeakerReferenceLike = AudioLike | np.ndarray | SpeakerId



def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or conversational messages (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "".join(_content_text(m.get("content", "")) for m in assistant)
    raise TypeError(f"cannot read text from a completion of type {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def parse_speech_tokens(text: str) -> list[int]:
    """Speech token ids from decoded text, as CosyVoice's GRPO recipe writes them (<|s_N|>)."""
    return [int(n) for n in SPEECH_TOKEN.findall(text)]


def as_audio(value: Any) -> AudioLike | None:
    """Audio from a dataset cell: path, bytes, (array, rate), or a Hugging Face datasets Audio dict.

    >>> as_audio({"array": np.zeros(4), "sampling_rate": 16000})[1]
    16000
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            return (np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]))
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
        raise ValueError(f"audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(value)}")
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return (np.asarray(value[0], dtype=np.float32), value[1])
    return value  # type: ignore[no-any-return]


def as_speaker_reference(value: Any) -> SpeakerReferenceLike | None:
    """A reference voice from a dataset cell: audio (see as_audio), an embedding, or a SpeakerId."""
    if isinstance(value, (np.ndarray, SpeakerId)):
        return value
    return as_audio(value)



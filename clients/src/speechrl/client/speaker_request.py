"""How the arguments of AsyncSpeakerClient.score become one ScoreSpeakerSimilarityRequest.

A reference voice is audio of the speaker, an embedding from EmbedSpeaker, or a registered name.
In TTS GRPO the G samples of a prompt are all compared with its prompt speaker: sent per item, a
batch of one group carries the same reference audio G times (most of the request's bytes and of
its serialisation time). So an audio that several items share goes into `reference_audios` once
and its items point at it with `reference_index`; an audio used by one item stays inline.

>>> request = score_request([b"s1", b"s2", b"s3"], [b"prompt", b"prompt", SpeakerId("bob")], None)
>>> len(request.reference_audios), [item.WhichOneof("reference") for item in request.items]
(1, ['reference_index', 'reference_index', 'speaker_id'])
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from speechrl.client.codec import AudioLike, numpy_to_tensor, to_audio
from speechrl.client.models import enum_value
from speechrl.v1 import common_pb2, speaker_pb2


@dataclass(frozen=True)
class SpeakerId:
    """A reference voice given by the name it was registered under (RegisterSpeaker).

    A plain str would be read as a file path, so names are wrapped.
    """

    name: str


# A reference voice: audio of the speaker, an embedding from EmbedSpeaker (1-D ndarray), or a name.
SpeakerReference = AudioLike | np.ndarray | SpeakerId


def is_one_reference(value: object) -> TypeGuard[SpeakerReference]:
    """True for one reference voice, False for a sequence of them (an (array, rate) pair is one)."""
    if isinstance(value, (SpeakerId, np.ndarray, common_pb2.Audio, str, bytes)):
        return True
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray) and isinstance(value[1], int)


def speaker_item(audio: AudioLike, reference: SpeakerReference) -> speaker_pb2.SpeakerSimilarityItem:
    """One item with its reference inline (reference_audio, reference_embedding or speaker_id)."""
    item = speaker_pb2.SpeakerSimilarityItem(audio=to_audio(audio))
    if isinstance(reference, SpeakerId):
        item.speaker_id = reference.name
    elif isinstance(reference, np.ndarray):
        item.reference_embedding.CopyFrom(numpy_to_tensor(np.asarray(reference, dtype=np.float32)))
    else:
        item.reference_audio.CopyFrom(to_audio(reference))
    return item


def reference_audios(references: Sequence[SpeakerReference]) -> list[common_pb2.Audio | None]:
    """Each reference given as audio, as one Audio message per distinct audio; None for a name or an embedding.

    References that are the same object, equal paths or equal bytes are converted once (a file is
    read once); references that convert to equal messages (a path and its bytes, equal arrays,
    equal Audio messages parsed from JSON) come back as the same message object.
    """
    by_source: dict[Hashable, common_pb2.Audio] = {}
    by_content: dict[bytes, common_pb2.Audio] = {}
    audios: list[common_pb2.Audio | None] = []
    for reference in references:
        if isinstance(reference, (SpeakerId, np.ndarray)):
            audios.append(None)
            continue
        if isinstance(reference, (str, os.PathLike)):
            source: Hashable = ("path", os.fspath(reference))
        elif isinstance(reference, (bytes, bytearray, memoryview)):
            source = ("bytes", bytes(reference))
        else:
            source = ("object", id(reference))  # references outlives this dict, so no id is reused
        if source not in by_source:
            audio = to_audio(reference)
            by_source[source] = by_content.setdefault(audio.SerializeToString(deterministic=True), audio)
        audios.append(by_source[source])
    return audios


def score_request(audios: Sequence[AudioLike], references: Sequence[SpeakerReference],
                  reward_mapping: str | None) -> speaker_pb2.ScoreSpeakerSimilarityRequest:
    """The request comparing audios[i] with references[i], each reference audio that several items use sent once.

    Args:
        audios: the speech whose voice is judged, one per item.
        references: one reference voice per item.
        reward_mapping: "cosine", "shifted" or "clipped"; None is the server's default.
    """
    request = speaker_pb2.ScoreSpeakerSimilarityRequest(
        reward_mapping=enum_value(speaker_pb2.SimilarityRewardMapping, reward_mapping, "SIMILARITY_REWARD_MAPPING_"))
    shared = reference_audios(references)
    uses = Counter(id(a) for a in shared if a is not None)
    index: dict[int, int] = {}  # id of a shared audio -> its position in request.reference_audios
    for audio, reference, reference_audio in zip(audios, references, shared, strict=True):
        if reference_audio is None or uses[id(reference_audio)] == 1:
            # An audio used once gains nothing from sharing, and inline it also suits servers older than reference_index.
            request.items.append(speaker_item(audio, reference if reference_audio is None else reference_audio))
            continue
        if id(reference_audio) not in index:
            index[id(reference_audio)] = len(request.reference_audios)
            request.reference_audios.append(reference_audio)
        request.items.add(audio=to_audio(audio), reference_index=index[id(reference_audio)])
    return request

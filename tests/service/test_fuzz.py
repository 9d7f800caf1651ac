"""Hypothesis fuzz of the real rules and intelligibility servers on loopback.

Random audio bytes, PCM fields (any rate, encoding number, channel count, data length), texts,
languages, weights and reward mappings: a server never crashes and never answers with an
unexplained status. The only answers allowed are OK (each item a score or an ItemError with a
code, message and field), INVALID_ARGUMENT naming a field, or RESOURCE_EXHAUSTED (shedding); after
every example the server still scores a good request. Bounded: 50 examples per test, no deadline.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.v1 import common_pb2, rule_rewards_pb2, rule_rewards_pb2_grpc
from speechrl.v1 import intelligibility_pb2 as ipb
from speechrl.v1 import intelligibility_pb2_grpc as ipb_grpc
from tests.support.servers import serve_in_thread

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
MAX_SECONDS = 2.0  # bounds the model's work per item: longer audio is refused before it runs


@pytest.fixture(scope="module")
def rules() -> Iterator[rule_rewards_pb2_grpc.RuleRewardsStub]:
    config = RulesConfig(port=free_port(), max_request_items=8, max_text_chars=400)
    with serve_in_thread(lambda: start_rules(config)) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield rule_rewards_pb2_grpc.RuleRewardsStub(channel)


@pytest.fixture(scope="module")
def intelligibility() -> Iterator[ipb_grpc.IntelligibilityScorerStub]:
    config = IntelligibilityConfig(port=free_port(), max_request_items=4, max_audio_seconds=MAX_SECONDS,
                                   max_text_chars=200)
    with serve_in_thread(lambda: start_intelligibility(config)) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield ipb_grpc.IntelligibilityScorerStub(channel)


def check_answer(call: object, request: object, item_fields: tuple[str, ...]) -> object | None:
    """The reply of an allowed answer (None for an allowed refusal); fails on anything else."""
    try:
        reply = call(request, timeout=60)  # type: ignore[operator]
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, f"{exc.code()}: {exc.details()}"
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert exc.details().split(":")[0].split(".")[0].split("[")[0] in ("items", "weights", "reward_mapping"), exc.details()
        return None
    for result in reply.results:
        if result.WhichOneof("outcome") == "error":
            error = result.error
            assert error.code != common_pb2.ITEM_ERROR_CODE_INTERNAL, error.message
            assert error.code != 0 and error.message and error.field.startswith("items["), error
            assert error.field.split(".")[1] in item_fields, error.field
    return reply


texts = st.text(max_size=120) | st.sampled_from(["", " ", "the cat sat", "?!", "a " * 300, "\x00", "ÄÖ 日本語"])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.none()


@FUZZ
@given(items=st.lists(st.tuples(texts, texts, st.lists(texts, max_size=3), st.sampled_from(["", "en", "de", "xx", "??"])),
                      max_size=10),
       weights=st.tuples(floats, floats, floats))
def test_rules_server_answers_every_request(rules: rule_rewards_pb2_grpc.RuleRewardsStub, items, weights) -> None:
    accuracy, hallucination, keyword = weights
    request = rule_rewards_pb2.ScoreRulesRequest(
        items=[rule_rewards_pb2.RuleRewardItem(hypothesis=h, reference=r, keywords=k, language=lang)
               for h, r, k, lang in items],
        weights=rule_rewards_pb2.RuleRewardWeights(**{name: value for name, value in
                                                      (("accuracy", accuracy), ("hallucination", hallucination),
                                                       ("keyword", keyword)) if value is not None}))
    reply = check_answer(rules.ScoreRules, request, ("hypothesis", "reference", "keywords", "language"))
    if reply is not None:
        assert len(reply.results) == len(items)  # type: ignore[attr-defined]
        for result in reply.results:  # type: ignore[attr-defined]
            if result.WhichOneof("outcome") == "score":
                assert math.isfinite(result.score.total) and math.isfinite(result.score.wer)
    good = rules.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(
        items=[rule_rewards_pb2.RuleRewardItem(hypothesis="a b", reference="a b")]), timeout=10)
    assert good.results[0].score.wer == 0.0


def wav_header(data: bytes, rate: int, channels: int, bits: int) -> bytes:
    """A WAV header whose fields may lie about the data that follows."""
    fmt = struct.pack("<HHIIHH", 1, channels & 0xFFFF, rate & 0xFFFFFFFF, 0, 0, bits & 0xFFFF)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + \
        b"data" + struct.pack("<I", len(data)) + data


rates = st.sampled_from([0, -1, 1, 8000, 16000, 44100, 192000, 2**31 - 1]) | st.integers(-(2**31), 2**31 - 1)
audio = st.one_of(
    st.builds(lambda data: common_pb2.Audio(encoded=data), st.binary(max_size=2000)),
    st.builds(lambda data, rate, ch, bits: common_pb2.Audio(encoded=wav_header(data, rate, ch, bits)),
              st.binary(max_size=4000), rates, st.integers(0, 70000), st.sampled_from([0, 8, 16, 24, 32, 7])),
    st.builds(lambda data, rate, enc, ch: common_pb2.Audio(pcm=common_pb2.RawPcm(
        data=data, sample_rate_hertz=rate, encoding=enc, channels=ch)),  # type: ignore[arg-type]
        st.binary(max_size=8000) | st.just(np.full(8000, np.nan, "<f4").tobytes()) | st.just(b"\x00" * 64000 * 4),
        rates, st.integers(-5, 5), st.integers(-(2**31), 2**31 - 1) | st.integers(0, 3)),
    st.just(common_pb2.Audio()),
)


@pytest.mark.slow
@FUZZ
@given(items=st.lists(st.tuples(audio, texts, st.sampled_from(["", "en", "fr", "zz", "english"])), max_size=5),
       mapping=st.integers(-3, 6))
def test_intelligibility_server_answers_every_request(intelligibility: ipb_grpc.IntelligibilityScorerStub,
                                                      items, mapping: int) -> None:
    request = ipb.ScoreIntelligibilityRequest(
        items=[ipb.IntelligibilityItem(audio=a, reference_text=text, language=lang) for a, text, lang in items],
        reward_mapping=mapping)  # type: ignore[arg-type]
    reply = check_answer(intelligibility.ScoreIntelligibility, request, ("audio", "reference_text", "language"))
    if reply is not None:
        assert len(reply.results) == len(items)  # type: ignore[attr-defined]
        for result in reply.results:  # type: ignore[attr-defined]
            if result.WhichOneof("outcome") == "score":
                assert math.isfinite(result.score.reward) and 0 < result.score.audio_duration_seconds <= MAX_SECONDS
    good = common_pb2.Audio(pcm=common_pb2.RawPcm(data=np.zeros(8000, "<f4").tobytes(), sample_rate_hertz=16000,
                                                  encoding=common_pb2.PCM_F32LE))
    reply = intelligibility.ScoreIntelligibility(ipb.ScoreIntelligibilityRequest(
        items=[ipb.IntelligibilityItem(audio=good, reference_text="hello")]), timeout=60)
    assert reply.results[0].WhichOneof("outcome") == "score"

"""The client SDK against the real rule-reward server: answers, retries, deadlines, errors, audio."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from speechrl.client import (
    AsyncRuleRewardsClient,
    ItemFailedError,
    RetryPolicy,
    RuleRewardsClient,
    ServiceError,
    SpeakerId,
    to_audio,
)
from speechrl.client._channel import channel_options, parse_endpoints
from speechrl.client.scorers import _prompt
from speechrl.client.speaker_request import speaker_item
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from speechrl.v1 import common_pb2, rule_rewards_pb2, rule_rewards_pb2_grpc
from tests.support.servers import serve_in_thread

HYPOTHESES = ["the cat sat on the mat", "a dog barked", "hello hello hello hello hello hello hello", "anything"]
REFERENCES = ["the cat sat on the mat", "the dog barked loudly", "hello world", ""]
KEYWORDS = [["cat", "mat"], ["dog"], [], []]
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def busy_rules() -> Iterator[str]:
    """A real rules server whose queue takes one item: every request of two items is shed."""
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_queue_items=1))) as running:
        yield f"127.0.0.1:{running.port}"


def raw_score(endpoint: str) -> rule_rewards_pb2.ScoreRulesResponse:
    request = rule_rewards_pb2.ScoreRulesRequest(
        items=[rule_rewards_pb2.RuleRewardItem(hypothesis=h, reference=r, keywords=k)
               for h, r, k in zip(HYPOTHESES, REFERENCES, KEYWORDS, strict=True)],
        weights=rule_rewards_pb2.RuleRewardWeights(keyword=0.5))
    with grpc.insecure_channel(endpoint) as channel:
        return rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(request, timeout=10)


def assert_same_as_raw(results: list[Any], raw: rule_rewards_pb2.ScoreRulesResponse) -> None:
    assert len(results) == len(raw.results)
    for result, expected in zip(results, raw.results, strict=True):
        if expected.HasField("error"):
            assert result.score is None and result.reward is None
            assert result.error.code == common_pb2.ItemErrorCode.Name(expected.error.code).removeprefix("ITEM_ERROR_CODE_")
            assert (result.error.message, result.error.field) == (expected.error.message, expected.error.field)
            continue
        s, e = result.score, expected.score
        assert result.error is None and result.reward == e.total
        assert (s.wer, s.accuracy_reward, s.hallucination_reward, s.keyword_precision, s.keyword_recall,
                s.keyword_reward, s.total) == (e.wer, e.accuracy_reward, e.hallucination_reward, e.keyword_precision,
                                               e.keyword_recall, e.keyword_reward, e.total)
        assert s.hallucination_reasons == tuple(e.hallucination_reasons)
        assert (s.word_counts.hits, s.word_counts.substitutions, s.word_counts.insertions, s.word_counts.deletions) == (
            e.word_counts.hits, e.word_counts.substitutions, e.word_counts.insertions, e.word_counts.deletions)


def test_sync_client_matches_the_raw_stub(rules: str) -> None:
    raw = raw_score(rules)
    with RuleRewardsClient(rules, timeout_s=10) as client:
        results = client.score(HYPOTHESES, REFERENCES, keywords=KEYWORDS, keyword_weight=0.5)
    assert_same_as_raw(results, raw)
    assert results[0].score is not None and results[0].score.wer == 0.0
    assert results[2].score is not None and "repeated_ngram" in results[2].score.hallucination_reasons


async def test_async_client_matches_the_raw_stub(rules: str) -> None:
    raw = raw_score(rules)
    async with AsyncRuleRewardsClient(rules, timeout_s=10) as client:
        results = await client.score(HYPOTHESES, REFERENCES, keywords=KEYWORDS, keyword_weight=0.5)
    assert_same_as_raw(results, raw)


def test_a_bad_item_comes_back_as_an_error_object_and_its_neighbours_are_scored(rules: str) -> None:
    with RuleRewardsClient(rules) as client:
        results = client.score(["a b", "a b"], ["a b", "   "])
    assert results[0].ok and results[0].reward == 1.0
    bad = results[1]
    assert not bad.ok and bad.score is None and bad.reward is None
    assert bad.error is not None and (bad.error.code, bad.error.field) == ("EMPTY_TEXT", "items[1].reference")
    with pytest.raises(ItemFailedError, match="EMPTY_TEXT"):
        bad.unwrap()
    assert results[0].unwrap().total == 1.0


def test_a_malformed_request_raises_service_error_without_retrying(rules: str) -> None:
    with RuleRewardsClient(rules, retry=FAST) as client, pytest.raises(ServiceError) as info:
        client.score([], [])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("items:") and info.value.attempts == 1


def test_arguments_of_different_lengths_are_refused_before_sending(rules: str) -> None:
    with RuleRewardsClient(rules) as client, pytest.raises(ValueError, match="one entry per item"):
        client.score(["a", "b"], ["a"])


def test_a_dead_first_endpoint_costs_one_attempt_and_the_live_one_answers(rules: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.INFO, logger="speechrl.client"), RuleRewardsClient([dead, rules], retry=FAST) as client:
        results = client.score(["a b"], ["a b"])
    assert results[0].reward == 1.0
    assert any("UNAVAILABLE" in r.message and dead in r.message for r in caplog.records)


async def test_a_dead_endpoint_alone_fails_with_unavailable_after_the_configured_attempts() -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with AsyncRuleRewardsClient(dead, retry=FAST, timeout_s=5) as client:
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            await client.score(["a"], ["a"])
        elapsed = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.attempts == 3 and info.value.endpoint == dead
    assert elapsed < 5


def test_the_deadline_bounds_all_attempts_together() -> None:
    dead = f"127.0.0.1:{free_port()}"
    patient = RetryPolicy(max_attempts=100, initial_backoff_s=0.2, max_backoff_s=0.2)
    with RuleRewardsClient(dead, retry=patient, timeout_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            client.score(["a"], ["a"])
        elapsed = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "deadline" in info.value.details
    assert 1 < info.value.attempts < 100
    assert elapsed < 2.5  # 1 s deadline plus slack for a loaded machine; 100 attempts would take 20 s


def test_resource_exhausted_is_retried_after_the_servers_hint(busy_rules: str) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=1.0, jitter=0.0)
    with RuleRewardsClient(busy_rules, retry=policy, timeout_s=10) as client:
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            client.score(["a", "b"], ["a", "b"])
        elapsed = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.attempts == 3
    assert info.value.retry_after_s == pytest.approx(0.2)
    # Two waits of the server's 200 ms hint, not the policy's 10-20 ms backoff.
    assert elapsed >= 0.4


def test_a_shedding_replica_is_skipped_for_a_live_one(busy_rules: str, rules: str) -> None:
    with RuleRewardsClient([busy_rules, rules], retry=FAST, timeout_s=10) as client:
        results = client.score(["a", "b"], ["a", "b"])
    assert [r.reward for r in results] == [1.0, 1.0]


def test_calls_start_on_successive_endpoints() -> None:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as one, \
            serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as two:
        endpoints = [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"]
        with RuleRewardsClient(endpoints) as client:
            for _ in range(4):
                client.score(["a"], ["a"])
        with RuleRewardsClient(endpoints[0]) as first, RuleRewardsClient(endpoints[1]) as second:
            assert first.get_service_status().items_processed == 2
            assert second.get_service_status().items_processed == 2


def test_retry_policy_with_real_status_codes() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.2)
    retried = {code for code in grpc.StatusCode if policy.should_retry(code)}
    assert retried == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert not policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)")
    rng = random.Random(0)
    for retry, nominal in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        delays = [policy.delay_s(retry, rng=rng) for _ in range(200)]
        assert nominal * 0.8 <= min(delays) < max(delays) <= nominal * 1.2  # jittered, never past the band
    assert policy.delay_s(0, hint_s=0.7, rng=rng) == 0.7
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_wait_until_ready_and_status(rules: str) -> None:
    with RuleRewardsClient(rules) as client:
        assert client.wait_until_ready(timeout_s=5) == {rules: "SERVING"}
        status = client.get_service_status()
    assert (status.service, status.backend, status.version) == ("speechrl.v1.RuleRewards", "rules", "0.1.0")
    assert status.max_batch_size == 32


async def test_wait_until_ready_gives_up_on_a_dead_endpoint() -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with AsyncRuleRewardsClient(dead) as client:
        started = time.monotonic()
        with pytest.raises(ServiceError, match="not ready") as info:
            await client.wait_until_ready(timeout_s=0.5)
        assert time.monotonic() - started < 3
        assert await client.health() == {dead: "UNAVAILABLE"}
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


async def test_bearer_token_and_metadata_reach_the_server() -> None:
    seen: list[dict[str, str]] = []

    class Recorder(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
            seen.append(dict(details.invocation_metadata or ()))  # type: ignore[arg-type]
            return await continuation(details)

    server = grpc.aio.server(interceptors=[Recorder()])
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("speechrl.v1.RuleRewards", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with AsyncRuleRewardsClient(f"127.0.0.1:{port}", token="s3cret", metadata=[("x-run", "42")]) as client:
            assert await client.health() == {f"127.0.0.1:{port}": "SERVING"}
    finally:
        await server.stop(None)
    assert seen[-1]["authorization"] == "Bearer s3cret" and seen[-1]["x-run"] == "42"


def test_sync_client_is_safe_from_many_threads(rules: str) -> None:
    with RuleRewardsClient(rules) as client, ThreadPoolExecutor(8) as pool:
        # Each thread's answer must be its own: reference i has i % 4 extra words, so wer = (i % 4) / (2 + i % 4).
        wers = list(pool.map(lambda i: client.score(["the cat"], ["the cat" + " sat" * (i % 4)])[0].unwrap().wer, range(32)))
    assert wers == [(i % 4) / (2 + i % 4) for i in range(32)]


async def test_sync_client_works_inside_a_running_loop(rules: str) -> None:
    # It blocks this loop for the call, but must not deadlock: the call runs on the client's own loop thread.
    with RuleRewardsClient(rules) as client:
        assert client.score(["a"], ["a"])[0].reward == 1.0


def test_audio_from_path_bytes_and_arrays(tmp_path: Any) -> None:
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt "  # any bytes: the server decodes, the client only carries them
    path = tmp_path / "a.wav"
    path.write_bytes(wav)
    assert to_audio(path) == common_pb2.Audio(encoded=wav)
    assert to_audio(str(path)) == common_pb2.Audio(encoded=wav)
    assert to_audio(wav) == common_pb2.Audio(encoded=wav)

    samples = np.array([0.0, 0.5, -1.0], dtype=np.float64)
    audio = to_audio((samples, 16000))
    assert audio.WhichOneof("source") == "pcm"
    assert (audio.pcm.sample_rate_hertz, audio.pcm.encoding, audio.pcm.channels) == (16000, common_pb2.PCM_F32LE, 1)
    np.testing.assert_array_equal(np.frombuffer(audio.pcm.data, "<f4"), samples.astype(np.float32))

    ints = to_audio((np.array([16384, -32768], dtype=np.int16), 8000))
    np.testing.assert_array_equal(np.frombuffer(ints.pcm.data, "<f4"), [0.5, -1.0])
    stereo = to_audio((np.zeros((4, 2), np.float32), 22050))
    assert stereo.pcm.channels == 2 and len(stereo.pcm.data) == 4 * 2 * 4
    with pytest.raises(TypeError, match="cannot use int"):
        to_audio(5)  # type: ignore[arg-type]


def test_speaker_references_and_prompts_become_the_right_messages() -> None:
    audio = (np.zeros(160, np.float32), 16000)
    assert speaker_item(audio, SpeakerId("alice")).speaker_id == "alice"
    embedded = speaker_item(audio, np.ones(4, np.float64))
    assert embedded.WhichOneof("reference") == "reference_embedding"
    assert list(embedded.reference_embedding.shape) == [4] and embedded.reference_embedding.dtype == common_pb2.DTYPE_FLOAT32
    assert speaker_item(audio, b"RIFF").reference_audio.encoded == b"RIFF"

    assert _prompt("hi", None).text == "hi"
    assert list(_prompt([1, 2, 3], None).token_ids.ids) == [1, 2, 3]
    with_suffix = _prompt(np.zeros((5, 8), np.float32), [7, 8])
    assert list(with_suffix.embeddings.shape) == [5, 8] and list(with_suffix.suffix_token_ids.ids) == [7, 8]


def test_endpoints_and_channel_options() -> None:
    assert parse_endpoints(["a:1, b:2", "c:3"]) == ("a:1", "b:2", "c:3")
    with pytest.raises(ValueError, match="no endpoint"):
        parse_endpoints(" , ")
    options = dict(channel_options(64))
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 64 * 1024 * 1024

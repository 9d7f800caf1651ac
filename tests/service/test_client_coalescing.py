"""Concurrent rule-reward calls through one client merged into one request, against a real rules server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import REGISTRY

from speechrl.client import REQUEST_ID, AsyncRuleRewardsClient, RuleResult, RuleRewardsClient, ServiceError
from speechrl.client.sync import _LoopThread
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from tests.support.servers import serve_in_thread

METHOD = "/speechrl.v1.RuleRewards/ScoreRules"
WORDS = ["the cat sat on the mat", "a dog barked", "hello world", "turn on the lights", "go home now"]


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def small_rules() -> Iterator[str]:
    """A real rules server that refuses requests of more than 8 items as INVALID_ARGUMENT."""
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_request_items=8))) as running:
        yield f"127.0.0.1:{running.port}"


def requests_answered(code: str = "OK") -> float:
    """ScoreRules calls answered with `code` by the servers of this process (the interceptor's counter)."""
    return REGISTRY.get_sample_value("speechrl_grpc_requests_total", {"method": METHOD, "code": code}) or 0.0


def pair(i: int) -> tuple[list[str], list[str]]:
    """Call i's items: mostly one, every fifth call two; every seventh has an empty reference (an item error)."""
    hyp, ref = WORDS[i % len(WORDS)], WORDS[(i * 3) % len(WORDS)]
    if i % 7 == 3:
        ref = ""
    if i % 5 == 4:
        return [hyp, "one more hypothesis"], [ref, ""] if i % 2 else [ref, "one more reference"]
    return [hyp], [ref]


async def test_concurrent_calls_are_one_request_and_each_caller_gets_its_own_results(rules: str) -> None:
    calls = [pair(i) for i in range(32)]
    async with AsyncRuleRewardsClient(rules, coalesce=False, timeout_s=10) as alone:
        expected = [await alone.score(h, r) for h, r in calls]
    async with AsyncRuleRewardsClient(rules, timeout_s=10) as client:
        before = requests_answered()
        got = await asyncio.gather(*(client.score(h, r) for h, r in calls))
        assert requests_answered() - before == 1
    assert got == expected
    # Item errors name the caller's own item, not its place in the merged request.
    errors = [(i, k, result.error.field) for i, results in enumerate(got) for k, result in enumerate(results)
              if result.error is not None]
    assert errors and all(field == f"items[{k}].reference" for _, k, field in errors)
    assert any(i > 0 for i, _, _ in errors) and any(k == 1 for _, k, _ in errors)


async def test_coalesce_false_sends_one_request_per_call(rules: str) -> None:
    async with AsyncRuleRewardsClient(rules, coalesce=False, timeout_s=10) as client:
        before = requests_answered()
        await asyncio.gather(*(client.score(*pair(i)) for i in range(32)))
        assert requests_answered() - before == 32


async def test_calls_with_different_weights_or_request_ids_are_not_merged(rules: str) -> None:
    hyps, refs, keywords = ["deploy grafana now"], ["deploy redis now"], [["redis", "grafana"]]
    weights = [{}, {"accuracy_weight": 0.5, "keyword_weight": 1.0}, {"accuracy_weight": 2.0, "hallucination_weight": 0.0}]
    async with AsyncRuleRewardsClient(rules, coalesce=False, timeout_s=10) as alone:
        expected = [await alone.score(hyps, refs, keywords=keywords, **w) for w in weights]

    async def with_request_id(request_id: str) -> list[RuleResult]:
        REQUEST_ID.set(request_id)  # this task's own context
        return await client.score(hyps, refs)

    async with AsyncRuleRewardsClient(rules, timeout_s=10) as client:
        before = requests_answered()
        got = await asyncio.gather(*(client.score(hyps, refs, keywords=keywords, **w) for w in weights * 4))
        assert requests_answered() - before == len(weights)
        assert got == expected * 4
        assert len({r[0].score.total for r in got[:3]}) == 3  # the weights did change the totals
        before = requests_answered()
        await asyncio.gather(with_request_id("a"), with_request_id("a"), with_request_id("b"))
        assert requests_answered() - before == 2


async def test_a_merged_request_refused_as_a_whole_is_resent_call_by_call(small_rules: str) -> None:
    # 8 one-item calls and one 9-item call: merged (17 items) the server refuses them all, so each
    # call is sent again alone: the 9-item caller gets its own refusal, the others their results.
    calls = [pair(i) for i in range(9) if i % 5 != 4]
    big = ([f"word {i}" for i in range(9)], [f"word {i}" for i in range(9)])
    async with AsyncRuleRewardsClient(small_rules, coalesce=False, timeout_s=10) as alone:
        expected = [await alone.score(h, r) for h, r in calls]
    async with AsyncRuleRewardsClient(small_rules, timeout_s=10) as client:
        ok, refused = requests_answered(), requests_answered("INVALID_ARGUMENT")
        *got, error = await asyncio.gather(*(client.score(h, r) for h, r in calls), client.score(*big),
                                           return_exceptions=True)
        assert requests_answered() - ok == len(calls)
        assert requests_answered("INVALID_ARGUMENT") - refused == 2  # the merged request, then the big call
    assert got == expected
    assert isinstance(error, ServiceError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 9 items" in error.details  # its own request, not the merged one's 17


async def test_a_caller_cancelled_before_the_flush_is_left_out(rules: str) -> None:
    async with AsyncRuleRewardsClient(rules, timeout_s=10) as client:
        items_before = (await client.get_service_status()).items_processed
        tasks = [asyncio.create_task(client.score([w], [w])) for w in WORDS]
        await asyncio.sleep(0)  # every task is now waiting for the flush
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert [r[0].score.wer for r in done if isinstance(r, list)] == [0.0] * (len(WORDS) - 1)
        assert (await client.get_service_status()).items_processed - items_before == len(WORDS) - 1


def test_the_sync_client_merges_calls_from_several_threads(rules: str) -> None:
    calls = [pair(i) for i in range(16)]
    with RuleRewardsClient(rules, coalesce=False, timeout_s=10) as alone:
        expected = [alone.score(h, r) for h, r in calls]
    gate, started = threading.Event(), threading.Barrier(len(calls) + 1)
    with RuleRewardsClient(rules, timeout_s=10) as client, ThreadPoolExecutor(len(calls)) as pool:
        client.wait_until_ready(timeout_s=10)
        before = requests_answered()
        # Hold the client's loop thread until every thread has handed it its call, so that all of
        # them are queued in one loop iteration however the threads are scheduled.
        _LoopThread.loop().call_soon_threadsafe(gate.wait, 10)

        def call(h: list[str], r: list[str]) -> list[RuleResult]:
            started.wait()
            return client.score(h, r)

        futures = [pool.submit(call, h, r) for h, r in calls]
        started.wait()
        time.sleep(1.0)  # the threads only need to reach run_coroutine_threadsafe (generous for a loaded CI box)
        gate.set()
        got = [f.result(timeout=10) for f in futures]
        assert requests_answered() - before == 1
    assert got == expected

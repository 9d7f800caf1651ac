"""Dynamic batching: coalescing, order, limits and isolation of a poisonous item."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import REGISTRY

from speechrl.services.batching import DeadlineExpired, DynamicBatcher, QueueFull, load_on_model_thread
from speechrl.services.errors import ErrorCode, ItemFailure


async def test_concurrent_callers_are_coalesced_and_get_their_own_results() -> None:
    sizes: list[int] = []

    def double(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [x * 2 for x in xs]

    batcher = DynamicBatcher(double, max_batch_size=16, max_wait_ms=20, name="t-coalesce")
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(32)))
    batcher.close()
    assert results == [[2 * i] for i in range(32)]
    assert max(sizes) > 1 and all(s <= 16 for s in sizes)
    assert batcher.items_processed == 32


async def test_batch_size_one_runs_each_item_alone() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda xs: sizes.append(len(xs)) or xs, max_batch_size=1, max_wait_ms=5, name="t-one")
    await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
    batcher.close()
    assert sizes == [1] * 5


async def test_a_large_request_is_split_and_reassembled_in_order() -> None:
    batcher = DynamicBatcher(lambda xs: [x + 1 for x in xs], max_batch_size=4, max_wait_ms=1, name="t-split")
    assert await batcher.submit(list(range(10))) == list(range(1, 11))
    batcher.close()


async def test_a_poisonous_item_fails_alone() -> None:
    def fragile(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise RuntimeError("model crashed on 13")
        return xs

    batcher = DynamicBatcher(fragile, max_batch_size=8, max_wait_ms=10, name="t-poison")
    out = await batcher.submit([1, 13, 2])
    batcher.close()
    assert out[0] == 1 and out[2] == 2
    assert isinstance(out[1], ItemFailure) and out[1].code is ErrorCode.INTERNAL
    assert "model crashed on 13" in out[1].message
    assert batcher.items_failed == 1


async def test_the_model_runs_off_the_event_loop_thread() -> None:
    threads: set[str] = set()
    batcher = DynamicBatcher(lambda xs: threads.add(threading.current_thread().name) or xs,
                             max_batch_size=2, max_wait_ms=1, name="t-thread")
    await batcher.submit([1, 2, 3])
    batcher.close()
    assert threads and threading.current_thread().name not in threads


async def test_a_model_is_loaded_on_the_thread_that_runs_its_batches() -> None:
    # A second thread running torch ops would leave a second OpenMP team (batching's docstring).
    thread, loaded_on = await load_on_model_thread("t-load", threading.get_ident)
    batcher = DynamicBatcher(lambda xs: [threading.get_ident() for _ in xs], max_batch_size=4, max_wait_ms=1,
                             name="t-load", executor=thread)
    ran_on = await batcher.submit([1, 2, 3, 4, 5])
    batcher.close()
    assert loaded_on != threading.get_ident()
    assert set(ran_on) == {loaded_on}


async def test_a_failed_load_shuts_its_thread_down() -> None:
    loaders: list[threading.Thread] = []

    def broken() -> None:
        loaders.append(threading.current_thread())
        raise OSError("no such model file")

    with pytest.raises(OSError, match="no such model file"):
        await load_on_model_thread("t-broken", broken)
    loaders[0].join(timeout=5)
    assert not loaders[0].is_alive()


async def test_queue_limit_sheds_load() -> None:
    gate = threading.Event()
    batcher = DynamicBatcher(lambda xs: gate.wait(5) and xs, max_batch_size=1, max_wait_ms=0,
                             name="t-shed", max_queue_items=2)
    first = asyncio.ensure_future(batcher.submit([1, 2]))
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull):
        await batcher.submit([3, 4, 5])
    gate.set()
    assert await first == [1, 2]
    batcher.close()


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(lambda xs: xs, max_batch_size=0, max_wait_ms=1, name="bad")


async def test_without_a_wait_items_arriving_during_a_batch_form_the_next_one() -> None:
    sizes: list[int] = []

    def slow(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        threading.Event().wait(0.05)
        return xs

    batcher = DynamicBatcher(slow, max_batch_size=32, max_wait_ms=0, name="t-greedy")
    first = asyncio.ensure_future(batcher.submit([0]))
    await asyncio.sleep(0.01)  # the first batch (one item) is running
    rest = await asyncio.gather(*(batcher.submit([i]) for i in range(1, 11)))
    assert await first == [0] and rest == [[i] for i in range(1, 11)]
    batcher.close()
    assert sizes == [1, 10], "no added latency when idle; everything that queued meanwhile runs together"


async def test_callers_that_come_back_together_are_waited_for_and_a_lone_caller_is_not() -> None:
    sizes: list[int] = []
    loop = asyncio.get_running_loop()

    def work(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        threading.Event().wait(0.002)
        return xs

    batcher = DynamicBatcher(work, max_batch_size=32, max_wait_ms=200, name="t-closed-loop")
    start = loop.time()
    for i in range(5):  # a lone client, one item at a time: never held back by max_wait_ms
        assert await batcher.submit([i]) == [i]
    assert loop.time() - start < 0.2, "a lone caller waited for company that never comes"

    async def client(index: int) -> None:  # sends again only after its reply, a network hop later
        for _ in range(10):
            await batcher.submit([index])
            await asyncio.sleep(0.001 * (1 + index % 4))

    sizes.clear()
    await asyncio.gather(*(client(i) for i in range(16)))
    batcher.close()
    # Greedy batching (max_wait_ms=0) splits them by their return times, into ~25 batches of 4-8.
    assert sum(sizes) == 160 and len(sizes) <= 12, f"16 returning clients ran in {len(sizes)} batches: {sizes}"


async def test_a_burst_of_separate_calls_runs_as_one_batch_and_a_lone_batch_caller_does_not_wait() -> None:
    sizes: list[int] = []
    loop = asyncio.get_running_loop()

    def work(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    batcher = DynamicBatcher(work, max_batch_size=32, max_wait_ms=200, name="t-burst")
    start = loop.time()
    for i in range(5):  # one caller, a GRPO group of 8 per call: all of a call's items queue at once
        assert await batcher.submit(list(range(8 * i, 8 * i + 8))) == list(range(8 * i, 8 * i + 8))
    assert loop.time() - start < 0.2, "a lone caller's batch waited for company that never comes"
    assert sizes == [8] * 5

    async def caller(index: int) -> list[int]:
        # One-item calls that reach the queue one event-loop turn apart, as gRPC hands the loop one received
        # call per callback; the last comes 50 ms after the burst, past its arrival gap.
        for _ in range(index):
            await asyncio.sleep(0)
        if index == 31:
            await asyncio.sleep(0.05)
        return await batcher.submit([index])

    sizes.clear()
    await batcher.submit([-1])  # the batch before the burst was a lone item: nothing says to expect 31
    sizes.clear()
    results = await asyncio.gather(*(caller(i) for i in range(32)))
    batcher.close()
    assert results == [[i] for i in range(32)]
    # Before the arrival gap a batch closed after a few quiet loop turns and then waited to match the one
    # before: the burst ran as 5, 9, 13, and 4 more held back for the late caller.
    # Closed on the gap, not at max_wait_ms: the late caller runs alone.
    assert len(sizes) <= 3 and sizes[-1] == 1, f"a burst of 31 callers and a late one ran as {sizes}"


async def test_items_past_their_deadline_are_dropped_unrun() -> None:
    seen: list[int] = []

    def slow(items: list[int]) -> list[int]:
        seen.extend(items)
        threading.Event().wait(0.3)
        return items

    batcher = DynamicBatcher(slow, max_batch_size=1, max_wait_ms=0, name="deadlines")
    first = batcher.enqueue([1])
    await asyncio.sleep(0.05)  # item 1 is running
    late = batcher.enqueue([2], deadline=time.monotonic() + 0.1)  # waits behind it past its deadline
    patient = batcher.enqueue([3], deadline=time.monotonic() + 30)
    assert await asyncio.gather(*first, *patient) == [1, 3]
    with pytest.raises(DeadlineExpired, match="deadline passed"):
        await late[0]
    assert seen == [1, 3], "no model time for an item nobody waits for"
    assert REGISTRY.get_sample_value("speechrl_items_expired_total", {"batcher": "deadlines"}) == 1
    batcher.close()

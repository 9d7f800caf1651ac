"""Dynamic batching: coalesce items of concurrent requests into model batches.

Callers `await batcher.submit(items)` from the event loop; one worker takes up to
`max_batch_size` items, waiting at most `max_wait_ms` after the first one for company, and runs
the engine's batch function in a single dedicated thread (models are not re-entrant, and on a
2-core machine a second model thread only competes for the same cores). `inline` runs it on the
event loop instead, for cheap pure-Python engines (the rule rewards): they hold the GIL anyway, so
a model thread adds a thread hand-off per batch and GIL switches against the loop, and no parallelism. Items of one request may
span batches and a batch may mix requests; results come back to each caller in its order.

A batch function that raises is retried item by item, so one poisonous item costs only itself an
ItemFailure(INTERNAL) and never its neighbours. With a DeviceGuard, each batch runs under the
device's GPU lease; a lease failure (Redis down, wait timeout) fails that batch's callers with the
exception, which the servicer turns into UNAVAILABLE.

A server loads its model on the same thread that later runs its batches (`model_thread`, handed
to the batcher as its executor). PyTorch's GNU OpenMP keeps one thread team per thread that runs
parallel ops; once a second team exists (a model loaded on a loader thread and run on the model
thread), the OpenMP threads outnumber the cores and libgomp stops spinning at its barriers: on
2 cores the speaker scorer's batches took ~11% longer, with ~18,000 context switches/s instead of ~100.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from speechrl.services.errors import ErrorCode, ItemFailure

if TYPE_CHECKING:
    from speechrl.services.config import ServerConfig
    from speechrl.services.residency import DeviceGuard

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
LoadedT = TypeVar("LoadedT")

BATCH_SIZE = Histogram("speechrl_batch_size", "Items per model batch", ["batcher"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SECONDS = Histogram("speechrl_batch_seconds", "Time the batch function took", ["batcher"])
QUEUE_DEPTH = Gauge("speechrl_queue_depth", "Items waiting for a batch", ["batcher"])
ITEMS = Counter("speechrl_items_total", "Items processed, by outcome", ["batcher", "outcome"])
EXPIRED = Counter("speechrl_items_expired_total", "Items dropped unrun because their caller had given up "
                  "(its deadline passed while the item waited, or the call was cancelled)", ["batcher"])

REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("speechrl_request_deadline",
                                                                               default=None)
"""time.monotonic() by which the current call's caller stops waiting; set per call by
servicing.grpc_method from the gRPC deadline, read by enqueue."""


# Before closing a batch on an empty queue, yield to the event loop this many times: gRPC hands the
# loop one received call per callback, so calls that have already arrived reach the queue only
# when the loop runs. Costs microseconds when idle.
GATHER_YIELDS = 4

# A burst of separate calls is still arriving while its items come at most this far apart: gRPC
# receives and parses one call at a time on the event loop (~0.1-1 ms each on 2 busy cores, more for
# audio). A batch closes after this long without an arrival, or at max_wait_ms, whichever is first.
ARRIVAL_GAP_S = 0.002


class QueueFull(RuntimeError):
    """More items are waiting than the batcher accepts; the caller should shed the request."""


class DeadlineExpired(RuntimeError):
    """The caller's deadline passed before its item ran; the item was not run (DEADLINE_EXCEEDED)."""


_EXPIRED = object()  # a result slot whose item was dropped unrun


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future
    deadline: float | None = None  # time.monotonic(); None: the caller waits as long as it takes


def model_thread(name: str) -> ThreadPoolExecutor:
    """The single thread that loads a server's model and runs its batches (one OpenMP team; module docstring)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")


async def load_on_model_thread(name: str, load: Callable[..., LoadedT], *args: object) -> tuple[ThreadPoolExecutor, LoadedT]:
    """A new model_thread and load(*args) run on it, the event loop free meanwhile; hand the thread to
    the model's DynamicBatcher. The thread is shut down when load fails."""
    thread = model_thread(name)
    try:
        return thread, await asyncio.get_running_loop().run_in_executor(thread, load, *args)
    except BaseException:
        thread.shutdown(wait=False, cancel_futures=True)
        raise


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Coalesces items from concurrent callers into calls of `process(list[item]) -> list[result]`.

    `process` returns one entry per item: a result, or an ItemFailure for that item.

    >>> async def demo():
    ...     b = DynamicBatcher(lambda xs: [x * 2 for x in xs], max_batch_size=8, max_wait_ms=2, name="demo")
    ...     out = await b.submit([1, 2, 3])
    ...     b.close()
    ...     return out
    >>> asyncio.run(demo())
    [2, 4, 6]
    """

    def __init__(self, process: Callable[[list[ItemT]], Sequence[ResultT | ItemFailure]], *,
                 max_batch_size: int, max_wait_ms: float, name: str, max_queue_items: int = 4096,
                 guard: DeviceGuard | None = None, inline: bool = False, executor: Executor | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self.name = name
        self.guard = guard
        if inline and guard is not None:
            raise ValueError("inline batches run on the event loop; a DeviceGuard's lease wait would block it")
        self.inline = inline
        self._outstanding = 0  # accepted items whose future is not done yet
        self._previous_batch_size = 1
        self.items_processed = 0
        self.items_failed = 0
        self._queue: asyncio.Queue[_Pending[ItemT, ResultT]] | None = None
        self._worker: asyncio.Task | None = None
        # The batcher owns its executor (shut down by close): the model_thread its model was loaded on.
        self._executor = executor if executor is not None else model_thread(name)

    @classmethod
    def configured(cls, process: Callable[[list[ItemT]], Sequence[ResultT | ItemFailure]], config: ServerConfig,
                   name: str, *, guard: DeviceGuard | None = None, inline: bool = False,
                   executor: Executor | None = None) -> DynamicBatcher[ItemT, ResultT]:
        """The batcher of a server: sizes and wait from its ServerConfig (flags, SPEECHRL_* variables);
        executor: the model_thread the model was loaded on (the batcher then owns it)."""
        return cls(process, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms, name=name,
                   max_queue_items=config.max_queue_items, guard=guard, inline=inline, executor=executor)

    async def submit(self, items: Sequence[ItemT]) -> list[ResultT | ItemFailure]:
        """Queue items and wait for their results, in order."""
        return list(await asyncio.gather(*self.enqueue(items)))

    def enqueue(self, items: Sequence[ItemT], deadline: float | None = None) -> list[asyncio.Future]:
        """Queue items; one future per item, each done when its batch is (for replies streamed per item).

        Call from the event loop. A caller that stops waiting should cancel the futures it no
        longer wants, so that their items are skipped. Items still unrun at deadline
        (time.monotonic(); default: the gRPC call's, see REQUEST_DEADLINE) are not run: their
        futures fail with DeadlineExpired, so no model time goes to answers nobody waits for.
        """
        deadline = REQUEST_DEADLINE.get() if deadline is None else deadline
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-batcher")
        # The bound counts every accepted item not yet answered: queued, in a forming batch or running.
        if self._outstanding + len(items) > self.max_queue_items:
            raise QueueFull(f"{self.name}: {self._outstanding} items already waiting (max_queue_items {self.max_queue_items})")
        loop = asyncio.get_running_loop()
        pending: list[_Pending[ItemT, ResultT]] = [_Pending(item, loop.create_future(), deadline) for item in items]
        self._outstanding += len(pending)
        for p in pending:
            p.future.add_done_callback(self._answered)
            self._queue.put_nowait(p)
        QUEUE_DEPTH.labels(self.name).set(self._queue.qsize())
        return [p.future for p in pending]

    def _answered(self, future: asyncio.Future) -> None:
        self._outstanding -= 1

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(loop)
            QUEUE_DEPTH.labels(self.name).set(self._queue.qsize())
            live = self._unexpired(batch)
            if not live:
                continue
            items = [p.item for p in live]
            deadlines = [p.deadline for p in live]
            run = functools.partial(self._process_in_time, deadlines)
            try:
                if self.inline:
                    results = run(items)
                elif self.guard is None:
                    results = await loop.run_in_executor(self._executor, run, items)
                else:
                    results = await self.guard.run(self._executor, run, items)
            except Exception as exc:  # noqa: BLE001 - infrastructure failure: every caller of the batch hears it
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(live, results, strict=True):
                if p.future.done():
                    continue
                if result is _EXPIRED:
                    p.future.set_exception(DeadlineExpired(f"{self.name}: the call's deadline passed before "
                                                           "its item ran; it was not run"))
                else:
                    p.future.set_result(result)

    def _unexpired(self, batch: list[_Pending[ItemT, ResultT]]) -> list[_Pending[ItemT, ResultT]]:
        """The batch without items whose caller gave up (cancelled, or past its deadline)."""
        now, live = time.monotonic(), []
        for p in batch:
            if p.future.done():  # cancelled: gRPC ends the handler when the client's deadline passes
                EXPIRED.labels(self.name).inc()
            elif p.deadline is not None and p.deadline <= now:
                EXPIRED.labels(self.name).inc()
                p.future.set_exception(DeadlineExpired(f"{self.name}: the call's deadline passed in the queue"))
            else:
                live.append(p)
        return live

    def _process_in_time(self, deadlines: list[float | None], items: list[ItemT]) -> list[object]:
        """_process_isolated on the items whose deadline has not passed by now (after any lease
        wait, in the model thread); the others get _EXPIRED and cost no model time."""
        now = time.monotonic()
        keep = [d is None or d > now for d in deadlines]
        if all(keep):
            return list(self._process_isolated(items))
        EXPIRED.labels(self.name).inc(keep.count(False))
        done = iter(self._process_isolated([i for i, k in zip(items, keep, strict=True) if k]) if any(keep) else [])
        return [next(done) if k else _EXPIRED for k in keep]

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[_Pending[ItemT, ResultT]]:
        """The next batch: what is queued, plus the items worth waiting for (at most max_wait_ms
        after the first).

        Waiting pays only when more items are coming, and two things say they are. Clients that wait
        for their reply before sending again (a trainer's workers, OpenRLHF's per-sample calls) come
        back together, a round trip after their batch was answered: so wait while the batch is
        smaller than the previous one. And a burst of separate calls arrives spread out (each call is
        received and parsed on the event loop in turn): once an item has come in after the first
        turn of the loop, keep waiting while items keep coming, and close the batch on a gap of
        ARRIVAL_GAP_S without one. A lone caller (one item, or one call's items, all queued at once)
        gets no added latency.
        """
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        expected = min(self._previous_batch_size, self.max_batch_size)
        yields = 0
        last_arrival: float | None = None  # loop.time() of the latest item that came after the first turn
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                if yields:
                    last_arrival = loop.time()
                continue
            now = loop.time()
            if len(batch) < expected:
                wait = deadline - now
            elif last_arrival is not None:
                wait = min(deadline, last_arrival + ARRIVAL_GAP_S) - now
            elif yields < GATHER_YIELDS:  # calls gRPC already received reach the queue only when the loop runs
                yields += 1
                await asyncio.sleep(0)
                continue
            else:
                break
            if wait <= 0:
                break
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow close()'s cancel.
                async with asyncio.timeout(wait):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
            yields, last_arrival = max(yields, 1), loop.time()
        self._previous_batch_size = len(batch)
        return batch

    def _process_isolated(self, items: list[ItemT]) -> list[ResultT | ItemFailure]:
        start = time.perf_counter()
        try:
            results = list(self.process(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(items) == 1:
                log.exception("%s: item failed", self.name)
                results = [ItemFailure(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")]
            else:
                log.warning("%s: batch of %d failed (%s); retrying item by item", self.name, len(items), exc)
                results = [r for item in items for r in self._process_isolated([item])]
                return results  # the single-item calls recorded their own metrics
        BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - start)
        BATCH_SIZE.labels(self.name).observe(len(items))
        failed = sum(isinstance(r, ItemFailure) for r in results)
        self.items_processed += len(items)
        self.items_failed += failed
        ITEMS.labels(self.name, "ok").inc(len(items) - failed)
        ITEMS.labels(self.name, "failed").inc(failed)
        return results

    def close(self) -> None:
        """Stop the worker; items still queued are abandoned."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

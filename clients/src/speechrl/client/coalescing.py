"""Concurrent small calls merged into one request: one gRPC call per event-loop iteration, not per caller.

Many reward loops score one sample per call from many tasks or threads at once. Each gRPC call
costs ~0.5-0.9 ms of client and server CPU before any work is done, more than scoring a rule
reward (~0.4 ms), so those calls cost mostly overhead that the server's batching cannot remove.
A `Coalescer` collects the calls made within one event-loop iteration, sends the compatible ones
(same key) as one request, and hands each caller its own slice of the results.

It adds no timer: the first call of an iteration schedules the send with `loop.call_soon`, so a
lone call goes out one loop iteration later, and calls already queued on the loop join it.

>>> import asyncio
>>> sent = []
>>> async def send(key, items):  # one request: here, upper-case every item
...     sent.append(list(items))
...     return [item.upper() for item in items]
>>> async def main():
...     merge = Coalescer(send)
...     return await asyncio.gather(merge.submit("k", ["a"]), merge.submit("k", ["b", "c"]))
>>> asyncio.run(main())
[['A'], ['B', 'C']]
>>> sent  # one request for both callers
[['a', 'b', 'c']]
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")  # an item of the request
R = TypeVar("R")

DEFAULT_MAX_ITEMS = 256
"""Most items in one merged request: the servers' default max_request_items."""


@dataclass(eq=False)
class _Call(Generic[T, R]):
    """One caller waiting for its results."""

    items: Sequence[T]
    future: asyncio.Future[list[R]]
    context: contextvars.Context
    """The caller's context, which its request runs in when it is sent alone."""


def _same(result: R, offset: int) -> R:
    return result


def _resolve(future: asyncio.Future[list[R]], results: list[R] | None = None,
             error: BaseException | None = None) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results or [])


class Coalescer(Generic[K, T, R]):
    """Merges the calls submitted within one event-loop iteration that share a key into one send.

    Args:
        send: sends one request of `items` under `key` and returns one result per item. The key
            must hold everything besides the items that the request depends on, including every
            context variable `send` reads: a merged request runs in its first caller's context.
        max_items: most items in one merged request; a call of more items (or of none) is sent
            alone, unchanged.
        rebase: turns a result of the merged request into what its caller sees, given the offset of
            the caller's first item in that request (e.g. renumbers "items[k]" in an item error);
            not called at offset 0.
        resend_alone: whether a failure of a merged request may be down to one caller's items, so
            that each call is sent again on its own and every caller gets its own outcome; when it
            says no (the server is down, time is up), every caller gets the failure.
    """

    def __init__(self, send: Callable[[K, Sequence[T]], Awaitable[list[R]]], *, max_items: int = DEFAULT_MAX_ITEMS,
                 rebase: Callable[[R, int], R] = _same,
                 resend_alone: Callable[[Exception], bool] = lambda error: True):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.send = send
        self.max_items = max_items
        self.rebase = rebase
        self.resend_alone = resend_alone
        # Calls waiting for the flush of their loop; a loop is here exactly while its flush is scheduled.
        self._pending: dict[asyncio.AbstractEventLoop, dict[K, list[_Call[T, R]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, key: K, items: Sequence[T]) -> list[R]:
        """The results of `items`, sent together with the other calls of this loop iteration under `key`."""
        if not 0 < len(items) <= self.max_items:
            return await self.send(key, items)
        loop = asyncio.get_running_loop()
        groups = self._pending.get(loop)
        if groups is None:
            groups = self._pending[loop] = {}
            loop.call_soon(self._flush, loop)
        call: _Call[T, R] = _Call(items, loop.create_future(), contextvars.copy_context())
        groups.setdefault(key, []).append(call)
        return await call.future  # cancelling the caller cancels the future, which drops it from the merge

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        for key, calls in self._pending.pop(loop).items():
            batch: list[_Call[T, R]] = []
            size = 0
            for call in (c for c in calls if not c.future.done()):
                if batch and size + len(call.items) > self.max_items:
                    self._start(loop, key, batch)
                    batch, size = [], 0
                batch.append(call)
                size += len(call.items)
            if batch:
                self._start(loop, key, batch)

    def _start(self, loop: asyncio.AbstractEventLoop, key: K, batch: list[_Call[T, R]]) -> None:
        task = loop.create_task(self._run(key, batch), context=batch[0].context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def abandon(_: object) -> None:  # every caller gone: stop the request instead of finishing it for no one
            if all(c.future.cancelled() for c in batch):
                task.cancel()

        for call in batch:
            call.future.add_done_callback(abandon)

    async def _run(self, key: K, batch: list[_Call[T, R]]) -> None:
        try:
            if len(batch) == 1:
                await self._alone(key, batch[0])
                return
            items = [item for call in batch for item in call.items]
            try:
                results = await self.send(key, items)
                if len(results) != len(items):
                    raise RuntimeError(f"send answered {len(results)} results for {len(items)} items")
            except Exception as error:  # noqa: BLE001 - whatever send raises is its callers' outcome
                if not self.resend_alone(error):
                    for call in batch:
                        _resolve(call.future, error=error)
                    return
                loop = asyncio.get_running_loop()
                await asyncio.gather(*(loop.create_task(self._alone(key, call), context=call.context)
                                       for call in batch))
                return
            offset = 0
            for call in batch:
                mine = results[offset:offset + len(call.items)]
                _resolve(call.future, [self.rebase(r, offset) for r in mine] if offset else mine)
                offset += len(call.items)
        except BaseException as error:  # cancelled (every caller gone, the loop closing) or a bug: no caller may hang
            for call in batch:
                if call.future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    call.future.cancel()
                else:
                    call.future.set_exception(error)
            raise

    async def _alone(self, key: K, call: _Call[T, R]) -> None:
        if call.future.done():
            return
        try:
            results = await self.send(key, call.items)
        except Exception as error:  # noqa: BLE001 - whatever send raises is its caller's outcome
            _resolve(call.future, error=error)
        else:
            _resolve(call.future, results)

"""A bound on the requests the trainer-protocol routes answer at once; past it, 429 with Retry-After.

OpenRLHF sends one HTTP request per sample and all of a rollout's samples at once, with no bound
of its own. The gateway turns each into one call on its shared scorer channel (HTTP/2 streams, not
a channel per request), where the scorer's dynamic batcher coalesces them; this limit keeps a
burst from queueing without end in front of it. The count lives in the app's event loop, so a
plain integer needs no lock.

>>> limiter = InflightLimiter(1)
>>> with limiter.slot():
...     limiter.busy
1
>>> limiter.busy
0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from starlette.requests import Request

from speechrl.services.gateway.config import GatewayConfig


class TooBusy(Exception):
    """More requests in flight than max_inflight_requests: 429 with Retry-After."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        super().__init__(f"{limit} requests already in flight on the trainer-protocol routes (max_inflight_requests); "
                         f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class InflightLimiter:
    """Counts requests in flight and refuses the ones past `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.busy = 0
        self.refused = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a request; raises TooBusy when none is free."""
        if self.busy >= self.limit:
            self.refused += 1
            raise TooBusy(self.limit)
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


def limiter_of(request: Request) -> InflightLimiter:
    """The app's limiter, made on first use from its config."""
    state = request.app.state
    if getattr(state, "inflight", None) is None:
        config: GatewayConfig = state.config
        state.inflight = InflightLimiter(config.max_inflight_requests)
    return state.inflight  # type: ignore[no-any-return]

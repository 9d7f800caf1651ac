"""The services panel: health, GetServiceStatus and rates of each service the gateway knows.

Throughput is the change of a service's item counter (GetServiceStatus.items_processed) over the
last RATE_WINDOW_S seconds of polls, so it needs no metrics port. Latency, batch size and queue
depth come from the service's Prometheus /metrics when `service_metrics` names it: the quantiles
of `speechrl_grpc_request_seconds` over the same window (the status and health calls the dashboard
itself makes excluded), the mean of `speechrl_batch_size`, the sum of `speechrl_queue_depth`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from speechrl.client import AsyncClient, ServiceError, ServiceStatus

RATE_WINDOW_S = 15.0
LATENCY_METRIC = "speechrl_grpc_request_seconds"
# Calls that are the dashboard's own polling, not work: left out of the latency.
POLLING_METHODS = ("/speechrl.v1.ServiceStatus/", "/grpc.health.v1.Health/")


@dataclass(frozen=True)
class Scrape:
    """What one Prometheus scrape of a service says, cumulative since the service started."""

    latency_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), work calls summed
    batch_items: float = 0.0  # sum of speechrl_batch_size
    batches: float = 0.0  # count of speechrl_batch_size
    queue_depth: float = 0.0  # speechrl_queue_depth summed over batchers (a gauge: now, not cumulative)


def parse_scrape(text: str) -> Scrape:
    """The dashboard's numbers from a Prometheus text exposition.

    >>> s = parse_scrape('speechrl_grpc_request_seconds_bucket{method="/speechrl.v1.RuleRewards/ScoreRules",le="0.1"} 3\\n'
    ...                  'speechrl_grpc_request_seconds_bucket{method="/speechrl.v1.RuleRewards/ScoreRules",le="+Inf"} 4\\n'
    ...                  'speechrl_grpc_request_seconds_bucket{method="/speechrl.v1.ServiceStatus/GetServiceStatus",le="+Inf"} 9\\n'
    ...                  'speechrl_queue_depth{batcher="rules"} 2\\n')
    >>> s.latency_buckets, s.queue_depth
    (((0.1, 3.0), (inf, 4.0)), 2.0)
    """
    buckets: dict[float, float] = {}
    batch_items = batches = queue = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{LATENCY_METRIC}_bucket" and not sample.labels.get("method", "").startswith(POLLING_METHODS):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == "speechrl_batch_size_sum":
                batch_items += sample.value
            elif sample.name == "speechrl_batch_size_count":
                batches += sample.value
            elif sample.name == "speechrl_queue_depth":
                queue += sample.value
    return Scrape(tuple(sorted(buckets.items())), batch_items, batches, queue)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: q of cumulative (le, count) buckets, linear within a bucket;
    None without observations. A quantile in the +Inf bucket reads as the highest finite bound.

    >>> histogram_quantile(0.5, [(0.1, 2), (0.2, 4), (math.inf, 4)])
    0.1
    >>> histogram_quantile(0.75, [(0.1, 2), (0.2, 4), (math.inf, 4)])
    0.15000000000000002
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_delta(new: Sequence[tuple[float, float]], old: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """new - old per bucket (a service that restarted, its counters reset, counts from zero: new)."""
    before = dict(old)
    if any(count < before.get(le, 0.0) for le, count in new):
        return tuple(new)
    return tuple((le, count - before.get(le, 0.0)) for le, count in new)


@dataclass
class Sample:
    at: float
    items: int
    scrape: Scrape | None


@dataclass
class RateWindow:
    """A service's samples over the last window_s seconds (plus the newest older one, the baseline)."""

    window_s: float = RATE_WINDOW_S
    samples: deque[Sample] = field(default_factory=deque)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while len(self.samples) > 2 and self.samples[1].at <= sample.at - self.window_s:
            self.samples.popleft()

    def rates(self) -> dict[str, float | None]:
        """throughput (items/s), latency p50/p95 (ms) and mean batch size over the window; None where unknown."""
        out: dict[str, float | None] = {"throughput_items_s": None, "latency_p50_ms": None, "latency_p95_ms": None,
                                        "mean_batch_size": None}
        if len(self.samples) < 2:
            return out
        first, last = self.samples[0], self.samples[-1]
        seconds = last.at - first.at
        if seconds > 0 and last.items >= first.items:
            out["throughput_items_s"] = (last.items - first.items) / seconds
        if last.scrape is not None and first.scrape is not None:
            calls = bucket_delta(last.scrape.latency_buckets, first.scrape.latency_buckets)
            for key, q in (("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95)):
                value = histogram_quantile(q, calls)
                out[key] = None if value is None else value * 1000
            batches = last.scrape.batches - first.scrape.batches
            if batches > 0:
                out["mean_batch_size"] = (last.scrape.batch_items - first.scrape.batch_items) / batches
        return out


@dataclass
class ServiceReading:
    """One poll of one service."""

    name: str
    health: dict[str, str]
    status: ServiceStatus | None
    error: str
    rates: dict[str, float | None]
    queue_depth: float | None


async def _scrape(http: httpx.AsyncClient, address: str | None) -> Scrape | None:
    if not address:
        return None
    try:
        reply = await http.get(f"http://{address}/metrics")
        reply.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_scrape(reply.text)


async def read_service(name: str, client: AsyncClient, http: httpx.AsyncClient, metrics: str | None,
                       window: RateWindow, timeout_s: float) -> ServiceReading:
    """Health of every endpoint, the status of one, the Prometheus scrape; then the window's rates."""
    async def status() -> ServiceStatus | ServiceError:
        try:
            return await client.get_service_status(timeout_s)
        except ServiceError as exc:
            return exc

    health, got, scrape = await asyncio.gather(client.health(timeout_s), status(), _scrape(http, metrics))
    if isinstance(got, ServiceError):
        return ServiceReading(name, health, None, f"{got.code.name}: {got.details}", window.rates(), None)
    window.add(Sample(time.monotonic(), got.items_processed, scrape))
    return ServiceReading(name, health, got, "", window.rates(), None if scrape is None else scrape.queue_depth)


async def read_services(clients: Mapping[str, AsyncClient], http: httpx.AsyncClient, metrics: Mapping[str, str],
                        windows: dict[str, RateWindow], timeout_s: float) -> list[ServiceReading]:
    """Every service, asked concurrently."""
    return list(await asyncio.gather(*(
        read_service(name, client, http, metrics.get(name), windows.setdefault(name, RateWindow()), timeout_s)
        for name, client in clients.items())))

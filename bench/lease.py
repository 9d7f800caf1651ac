"""GPU lease timings on local Redis: grant latency, handoff between two processes, model moves.

    python bench/lease.py [--redis-url URL] [--rounds N]

Grant latency: one uncontended acquire (one Lua round trip). Handoff: from the holder's release
call to the grant in a second process that was waiting (woken by the release, not by polling).
Contention: 64 clients, each its own GpuLease, cycling acquire / release on one device; the
device's event stream (grants, releases, expiries) must stay at its cap however many events pass.
Model move: a 100M-parameter torch model to the GPU and back (skipped without a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time

import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(__file__))
from sections import percentile, write_section

from speechrl.services.lease import GpuLease, LeaseSettings
from speechrl.services.lease.lease import device_prefix
from speechrl.services.lease.status import device_status

DEVICE = "bench:0"


async def grant_latency(url: str, rounds: int) -> list[float]:
    client = aioredis.Redis.from_url(url)
    lease = GpuLease(client, "bench-grant")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        grant = await lease.acquire(DEVICE)
        times.append(time.perf_counter() - start)
        await lease.release(grant)
    await client.aclose()
    return times


def _waiter(url: str, rounds: int, go: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(url)
        lease = GpuLease(client, "bench-waiter", LeaseSettings(poll_ms=1000, waiter_ttl_ms=5000))
        for _ in range(rounds):
            await asyncio.get_running_loop().run_in_executor(None, go.wait, 30)
            go.clear()
            grant = await lease.acquire(DEVICE)
            out.put(time.monotonic())
            await lease.release(grant)
        await client.aclose()

    asyncio.run(run())


async def handoff(url: str, rounds: int) -> list[float]:
    """Release-to-grant times across two processes: we hold, the other queues, we release."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_waiter, args=(url, rounds, go, out))
    proc.start()
    client = aioredis.Redis.from_url(url)
    lease = GpuLease(client, "bench-holder")
    times = []
    for _ in range(rounds):
        grant = await lease.acquire(DEVICE, timeout=30)
        go.set()
        while not (await device_status(client, DEVICE)).queue:  # until the waiter queued behind us
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.005)  # and is blocked on its wake-up list
        released_at = time.monotonic()
        await lease.release(grant)
        granted_at = await asyncio.get_running_loop().run_in_executor(None, out.get, True, 30)
        times.append(granted_at - released_at)
        await asyncio.sleep(0.01)  # the waiter releases before our next acquire
    proc.join(30)
    await client.aclose()
    return times


def model_move() -> str:
    import torch

    if not torch.cuda.is_available():
        return "No GPU on this machine: the 100M-parameter move was not measured (run this script on a GPU box)."
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])  # ~100.7M parameters
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.to("cuda")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.to("cpu")
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1))
    on, off = min(r[0] for r in rows), min(r[1] for r in rows)
    return f"{params / 1e6:.1f}M fp32 parameters: to GPU {on * 1000:.0f} ms, back to CPU {off * 1000:.0f} ms (best of 3)."


async def contention(url: str, clients: int, rounds: int, events_max: int) -> tuple[int, int, int, list[float]]:
    """(events written, stream length, stream bytes, grant waits in s) of clients cycling on one device."""
    client = aioredis.Redis.from_url(url, max_connections=clients * 2)
    device = f"{DEVICE}-contention"
    prefix = device_prefix(LeaseSettings.namespace, device)
    await client.delete(f"{prefix}:events")
    settings = LeaseSettings(events_max=events_max)
    waits: list[float] = []

    async def cycle(n: int) -> None:
        lease = GpuLease(client, f"bench-client-{n}", settings)
        for _ in range(rounds):
            start = time.perf_counter()
            grant = await lease.acquire(device, timeout=120)
            waits.append(time.perf_counter() - start)
            await lease.release(grant)

    await asyncio.gather(*(cycle(n) for n in range(clients)))
    length = await client.xlen(f"{prefix}:events")
    size = await client.memory_usage(f"{prefix}:events") or 0
    await client.aclose()
    return 2 * clients * rounds, length, size, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("SPEECHRL_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    grants = asyncio.run(grant_latency(args.redis_url, args.rounds))
    handoffs = asyncio.run(handoff(args.redis_url, max(50, args.rounds // 10)))
    cap = 1000
    written, length, size, waits = asyncio.run(contention(args.redis_url, 64, max(10, args.rounds // 50), cap))
    ms = lambda v: f"{v * 1000:.2f}"  # noqa: E731
    body = f"""
| measure | n | p50 ms | p99 ms | target |
|---|---|---|---|---|
| uncontended grant (acquire) | {len(grants)} | {ms(percentile(grants, 50))} | {ms(percentile(grants, 99))} | p50 < 2 ms |
| handoff, release -> grant in another process | {len(handoffs)} | {ms(percentile(handoffs, 50))} | {ms(percentile(handoffs, 99))} | |
| grant wait, 64 clients cycling on one device | {len(waits)} | {ms(percentile(waits, 50))} | {ms(percentile(waits, 99))} | |

Event stream under that contention: {written} events written, {length} kept (cap {cap}), {size / 1024:.0f} KiB
in Redis ({size / max(length, 1):.0f} bytes an event).

{model_move()}
"""
    write_section("lease", "GPU lease (bench/lease.py)", body)


if __name__ == "__main__":
    main()

"""A separate process that uses the GPU lease, for tests that need real contention and kills.

    python tests/lease_worker.py contend URL DEVICE N OUT   # N grants, append "fence start end" lines to OUT
    python tests/lease_worker.py hold URL DEVICE TTL_MS     # take the lease, print "granted FENCE", hold forever
    python tests/lease_worker.py wait URL DEVICE            # queue for the lease, print "queued", wait forever
"""

from __future__ import annotations

import asyncio
import sys
import time

import redis.asyncio as aioredis

from speechrl.services.lease import GpuLease, LeaseSettings


async def contend(url: str, device: str, n: int, out: str) -> None:
    lease = GpuLease(aioredis.Redis.from_url(url), owner=f"worker-{n}", settings=LeaseSettings(ttl_ms=5000))
    lines = []
    for _ in range(n):
        async with lease.hold(device, timeout=120) as grant:
            start = time.monotonic()
            await asyncio.sleep(0.001)
            end = time.monotonic()
        lines.append(f"{grant.fence} {start:.9f} {end:.9f}\n")
    with open(out, "a") as f:
        f.writelines(lines)


async def hold(url: str, device: str, ttl_ms: int) -> None:
    lease = GpuLease(aioredis.Redis.from_url(url), owner="holder", settings=LeaseSettings(ttl_ms=ttl_ms))
    async with lease.hold(device) as grant:
        print(f"granted {grant.fence}", flush=True)
        await asyncio.sleep(3600)


async def wait(url: str, device: str) -> None:
    lease = GpuLease(aioredis.Redis.from_url(url), owner="doomed-waiter", settings=LeaseSettings(waiter_ttl_ms=500, poll_ms=50))
    task = asyncio.create_task(lease.acquire(device))
    await asyncio.sleep(0.3)
    print("queued", flush=True)
    await task


if __name__ == "__main__":
    mode, url, device, *rest = sys.argv[1:]
    if mode == "contend":
        asyncio.run(contend(url, device, int(rest[0]), rest[1]))
    elif mode == "hold":
        asyncio.run(hold(url, device, int(rest[0])))
    else:
        asyncio.run(wait(url, device))

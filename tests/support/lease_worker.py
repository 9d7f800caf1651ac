"""A separate process that uses the GPU lease, for tests that need real contention and kills.

    python tests/support/lease_worker.py contend URL DEVICE N OUT   # N grants, append "fence start end" lines to OUT
    python tests/support/lease_worker.py hold URL DEVICE TTL_MS     # take the lease, print "granted FENCE", hold forever
    python tests/support/lease_worker.py wait URL DEVICE            # queue for the lease, print "queued", wait forever
    python tests/support/lease_worker.py churn URL DEVICE SECONDS OUT  # take turns for SECONDS through Redis outages,
                                                               # append "fence start last_work lost" lines to OUT
"""

from __future__ import annotations

import asyncio
import faulthandler
import random
import sys
import time

from speechrl.services.lease import GpuLease, LeaseError, LeaseSettings, lease_redis


async def contend(url: str, device: str, n: int, out: str) -> None:
    lease = GpuLease(lease_redis(url), owner=f"worker-{n}", settings=LeaseSettings(ttl_ms=5000))
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
    lease = GpuLease(lease_redis(url), owner="holder", settings=LeaseSettings(ttl_ms=ttl_ms))
    async with lease.hold(device) as grant:
        print(f"granted {grant.fence}", flush=True)
        await asyncio.sleep(3600)


async def wait(url: str, device: str) -> None:
    lease = GpuLease(lease_redis(url), owner="doomed-waiter", settings=LeaseSettings(waiter_ttl_ms=500, poll_ms=50))
    task = asyncio.create_task(lease.acquire(device))
    await asyncio.sleep(0.3)
    print("queued", flush=True)
    await task


async def churn(url: str, device: str, seconds: float, out: str) -> None:
    """Hold for 50-800 ms at a time (often across a restart), doing "work" every 5 ms only while the lease is still ours,
    and record when work last happened: a holder paused by the OS does no work while paused."""
    lease = GpuLease(lease_redis(url), owner="churn",
                     settings=LeaseSettings(ttl_ms=1000, waiter_ttl_ms=600, poll_ms=50))
    stop_at = time.monotonic() + seconds
    lines = []
    while time.monotonic() < stop_at:
        try:
            async with lease.hold(device, timeout=2) as grant:
                start = last_work = time.monotonic()
                until = start + random.uniform(0.05, 0.8)
                while (now := time.monotonic()) < until and lease.still_held(grant):
                    last_work = now
                    await asyncio.sleep(0.005)
                lines.append(f"{grant.fence} {start:.9f} {last_work:.9f} {int(grant.lost.is_set())}\n")
        except LeaseError:  # Redis down or the quiet period: try again
            await asyncio.sleep(0.05)
    with open(out, "a") as f:
        f.writelines(lines)


def dump_tasks_later(seconds: float) -> None:
    """A hung worker idles in the event loop's select, so a thread dump shows nothing: print where
    every asyncio task waits instead (on the loop, which still runs while the tasks are stuck)."""
    def dump() -> None:
        for task in asyncio.all_tasks():
            print(f"--- {task!r}", file=sys.stderr)
            # task.get_stack() stops at the task's own coroutine; follow what each coroutine awaits.
            awaited = task.get_coro()
            while (frame := getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)) is not None:
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}", file=sys.stderr)
                awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
            print(f"    waiting on {awaited!r}", file=sys.stderr)
        sys.stderr.flush()
    asyncio.get_running_loop().call_later(seconds, dump)


async def main(mode: str, url: str, device: str, rest: list[str]) -> None:
    dump_tasks_later(60)
    if mode == "contend":
        await contend(url, device, int(rest[0]), rest[1])
    elif mode == "churn":
        await churn(url, device, float(rest[0]), rest[1])
    elif mode == "hold":
        await hold(url, device, int(rest[0]))
    else:
        await wait(url, device)


if __name__ == "__main__":
    # A worker that hangs shows where, instead of only timing out the test that waits for it.
    faulthandler.dump_traceback_later(90, exit=True)
    mode, url, device, *rest = sys.argv[1:]
    asyncio.run(main(mode, url, device, rest))

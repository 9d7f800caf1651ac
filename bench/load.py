"""Load test on loopback: N concurrent clients for a bounded time against the gRPC scorers and the gateway.

    python bench/load.py [--clients 64] [--seconds 60] [--targets rules,gateway-rules,intelligibility]

Each target is served by its own `speechrl serve` process (so the load generator does not share a
GIL with it); each client is a coroutine that sends one request, waits for the answer and sends
the next, until time is up. Clients do not retry: a request the server sheds (gRPC
RESOURCE_EXHAUSTED with retry-after-ms, HTTP 429) is counted as shed, the documented answer to
overload; anything else that is not a success is an error. Reports throughput, p50/p99 latency of
the successes, shed and errors per target, into bench/results/load.md.

Targets: `rules` (gRPC ScoreRules, one item), `gateway-rules` (POST /v1/rules/score through the
gateway to its own rules server), `intelligibility` (gRPC, one 1 s clip through Whisper tiny.en).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from sections import percentile, write_section

from speechrl.services.ports import free_port
from speechrl.v1 import (
    common_pb2,
    intelligibility_pb2,
    intelligibility_pb2_grpc,
    rule_rewards_pb2,
    rule_rewards_pb2_grpc,
)

OK, SHED = "ok", "shed"
RULES_REQUEST = rule_rewards_pb2.ScoreRulesRequest(items=[rule_rewards_pb2.RuleRewardItem(
    hypothesis="the cat sat on a mat", reference="the cat sat on the mat", keywords=["cat"])])


@dataclass
class LoadResult:
    """What N clients saw in `seconds`: latencies of the successes and a count of every outcome."""

    target: str
    clients: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def errors(self) -> int:
        return sum(n for kind, n in self.outcomes.items() if kind not in (OK, SHED))

    def row(self) -> str:
        ok = self.outcomes[OK]
        p50 = percentile(self.latencies_s, 50) * 1e3 if self.latencies_s else float("nan")
        p99 = percentile(self.latencies_s, 99) * 1e3 if self.latencies_s else float("nan")
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items()) if k not in (OK, SHED)) or "0"
        return (f"| {self.target} | {self.clients} | {self.seconds:.0f} | {ok} | {ok / self.seconds:.0f} | "
                f"{p50:.1f} | {p99:.1f} | {self.outcomes[SHED]} | {kinds} |")


async def run_load(target: str, call: Callable[[], Awaitable[str]], clients: int, seconds: float) -> LoadResult:
    """Run `clients` loops of `call()` (which returns OK, SHED or an error name) for `seconds`."""
    result = LoadResult(target, clients, seconds)
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                outcome = await call()
            except Exception as exc:  # noqa: BLE001 - every failure is counted by kind, none stops the run
                outcome = type(exc).__name__
            if outcome == OK:
                result.latencies_s.append(time.perf_counter() - started)
            result.outcomes[outcome] += 1
            if outcome == SHED:
                await asyncio.sleep(0.05)  # a client honouring the retry hint, roughly

    await asyncio.gather(*(client() for _ in range(clients)))
    return result


def grpc_outcome(exc: grpc.aio.AioRpcError) -> str:
    return SHED if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else exc.code().name


def rules_call(channel: grpc.aio.Channel) -> Callable[[], Awaitable[str]]:
    stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)

    async def call() -> str:
        try:
            reply = await stub.ScoreRules(RULES_REQUEST, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return grpc_outcome(exc)
        return OK if reply.results[0].WhichOneof("outcome") == "score" else "item_error"

    return call


def intelligibility_call(channel: grpc.aio.Channel) -> Callable[[], Awaitable[str]]:
    stub = intelligibility_pb2_grpc.IntelligibilityScorerStub(channel)
    samples = (0.05 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype("<f4")
    audio = common_pb2.Audio(pcm=common_pb2.RawPcm(data=samples.tobytes(), sample_rate_hertz=16000,
                                                   encoding=common_pb2.PCM_F32LE))
    request = intelligibility_pb2.ScoreIntelligibilityRequest(
        items=[intelligibility_pb2.IntelligibilityItem(audio=audio, reference_text="a tone")])

    async def call() -> str:
        try:
            reply = await stub.ScoreIntelligibility(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return grpc_outcome(exc)
        return OK if reply.results[0].WhichOneof("outcome") == "score" else "item_error"

    return call


class HttpConnections:
    """Keep-alive HTTP/1.1 connections that send one pre-encoded POST, a connection per client.

    The load generator must not be what is measured: httpx's AsyncClient spent ~7 ms of CPU a request
    here (64 clients held a whole core while the gateway used a third of one), so the gateway looked
    slow. Writing fixed bytes and reading the reply by its Content-Length costs a small fraction of that.
    """

    def __init__(self, url: str, body: Mapping[str, object]):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        payload = json.dumps(body).encode()
        self.request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def post(self) -> int:
        """Send the request on an idle connection (or a new one); the reply's status code."""
        reader, writer = self.idle.pop() if self.idle else await self._open()
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines if ": " in line)}
        length = headers.get("content-length")
        if length is None:
            raise RuntimeError(f"reply without Content-Length: {status_line}")
        await reader.readexactly(int(length))
        self.idle.append((reader, writer))
        return int(status_line.split()[1])

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self.opened:
            writer.close()


def http_call(connections: HttpConnections) -> Callable[[], Awaitable[str]]:
    async def call() -> str:
        status = await connections.post()
        if status == 429:
            return SHED
        return OK if status == 200 else f"http_{status}"

    return call


@contextmanager
def serve(*args: str, ready: Callable[[], bool], timeout_s: float = 120) -> Iterator[None]:
    """`speechrl serve <args>` in a subprocess, until `ready()`; terminated (drained) afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "speechrl.services.cli", "serve", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"speechrl serve {' '.join(args)} did not become ready")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def grpc_ready(port: int) -> Callable[[], bool]:
    from speechrl.services.healthcheck import grpc_status

    return lambda: grpc_status(f"127.0.0.1:{port}") == "SERVING"


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    return check


async def load_grpc(target: str, port: int, make: Callable[[grpc.aio.Channel], Callable[[], Awaitable[str]]],
                    clients: int, seconds: float, channels: int = 8) -> LoadResult:
    """`clients` coroutines over `channels` channels (HTTP/2 multiplexes the rest, as trainers do)."""
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    try:
        return await run_load(target, _spread([make(c) for c in opened]), clients, seconds)
    finally:
        await asyncio.gather(*(c.close(None) for c in opened))


def _spread(calls: list[Callable[[], Awaitable[str]]]) -> Callable[[], Awaitable[str]]:
    """One call function that cycles through `calls`, so load spreads over every channel."""
    counter = iter(range(1 << 62))

    async def call() -> str:
        return await calls[next(counter) % len(calls)]()

    return call


async def load_http(target: str, url: str, clients: int, seconds: float) -> LoadResult:
    body = {"items": [{"hypothesis": "the cat sat on a mat", "reference": "the cat sat on the mat", "keywords": ["cat"]}]}
    connections = HttpConnections(url, body)
    try:
        return await run_load(target, http_call(connections), clients, seconds)
    finally:
        await connections.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="Concurrent clients per target.")
    parser.add_argument("--seconds", type=float, default=60.0, help="How long each target is driven.")
    parser.add_argument("--targets", default="rules,gateway-rules", help="Comma-separated: rules, gateway-rules, "
                                                                          "intelligibility.")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    results: list[LoadResult] = []
    rules_port = free_port()
    with serve("rules", "--port", str(rules_port), ready=grpc_ready(rules_port)):
        if "rules" in targets:
            results.append(asyncio.run(load_grpc("rules (gRPC)", rules_port, rules_call, args.clients, args.seconds)))
        if "gateway-rules" in targets:
            gw_port = free_port()
            url = f"http://127.0.0.1:{gw_port}"
            with serve("gateway", "--port", str(gw_port), "--rules", f"127.0.0.1:{rules_port}", "--intelligibility", "",
                       "--speaker", "", "--log-level", "warning", ready=http_ready(f"{url}/readyz")):
                results.append(asyncio.run(load_http("gateway -> rules (HTTP)", f"{url}/v1/rules/score",
                                                     args.clients, args.seconds)))
    if "intelligibility" in targets:
        port = free_port()
        with serve("intelligibility", "--port", str(port), "--max-wait-ms", "5", ready=grpc_ready(port), timeout_s=300):
            results.append(asyncio.run(load_grpc("intelligibility (gRPC, 1 s clip)", port, intelligibility_call,
                                                 args.clients, args.seconds)))
    body = ("Each client sends one request, waits for its answer, sends the next; no retries. Shed = "
            "RESOURCE_EXHAUSTED / 429 (documented overload answer, the SDK retries it after the hint); "
            "errors = anything else. Latency of successes. Default server settings, loopback, "
            "load generator and servers on the same machine.\n\n"
            "| target | clients | s | ok | req/s | p50 ms | p99 ms | shed | errors |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(r.row() for r in results))
    write_section("load", f"Load: {args.clients} concurrent clients for {args.seconds:g} s (bench/load.py)", body)
    if any(r.errors for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

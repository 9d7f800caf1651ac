"""The client side of bench/peers.py: one process per stack that drives its server with the benchmark's load.

    python bench/peers_driver.py --stack NAME --endpoint ADDRESS

bench/peers.py starts one per stack (with the services' process settings, as the stack's own clients
run) and sends it one JSON command a line on stdin; each answer is one JSON line on stdout:

- {"op": "check", "scorer": S, "items": N}: items 0..N-1 in one call; answers {"results": [...]}
- {"op": "concurrent", "scorer": S, "callers": 32, "items": N}: `callers` asyncio tasks share one client
  and send one-item calls until N items are done (the OpenRLHF / verl per-sample pattern)
- {"op": "sequential", "scorer": S, "batch": 8, "items": N}: one caller, calls of `batch` items one
  after another (a GRPO group)
- {"op": "load", "scorer": S, "callers": 64, "seconds": T}: bench/load.py's run_load: `callers` loops of
  one-item calls until T has passed, calls in flight then answered and counted
Timed ops answer {"items", "seconds", "latencies_s", "errors"}: items scored, wall time from the first
call to the last answer, each call's latency, and failures by kind (an item answered with an error
counts as one).

The items are bench/scorers.py's (its espeak-ng utterances, GRPO groups of 8, every rule hypothesis new
text) as plain dicts (peers_serving), and every stack's client sends the same ones: the SpeechRL SDK
over gRPC, Triton's own asyncio gRPC client (tritonclient) for PyTriton, and one aiohttp session of
keep-alive connections for the HTTP stacks (the gateway, Ray Serve, LitServe).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import scorers
from load import OK, run_load
from peers_serving import AUDIO_FIELDS, COMPARED, MAX_BATCH_SIZE, TEXT_FIELDS, Item, Result, to_json

TIMEOUT_S = 600.0  # every client waits as long as it takes: 64 callers queue for tens of seconds on the ASR scorer


class Caller(Protocol):
    """A stack's client: scores a batch of items in one call, one result dict per item."""

    async def score(self, scorer: str, items: list[Item]) -> list[Result]: ...

    async def close(self) -> None: ...


class SdkCaller:
    """SpeechRL's asyncio SDK over gRPC, as a trainer uses it (the rules client coalesces concurrent calls,
    its default; the speaker client sends a reference audio that several items share once)."""

    def __init__(self, endpoints: dict[str, str]):
        self.clients = {name: scorer.async_client(endpoints[name], timeout_s=TIMEOUT_S)
                        for name, scorer in scorers.SCORERS.items()}

    async def score(self, scorer: str, items: list[Item]) -> list[Result]:
        client = self.clients[scorer]
        if scorer == "intelligibility":
            replies = await client.score([i["audio"] for i in items], [i["reference_text"] for i in items])
        elif scorer == "speaker":
            replies = await client.score([i["audio"] for i in items], [i["reference_audio"] for i in items])
        else:
            replies = await client.score([i["hypothesis"] for i in items], [i["reference"] for i in items])
        return [{"score": {f: getattr(r.score, f) for f in COMPARED[scorer]}} if r.ok
                else {"error": {"code": r.error.code, "message": r.error.message}} for r in replies]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients.values()))


@functools.lru_cache(maxsize=256)
def _base64(data: bytes) -> str:
    """base64 of an utterance, once per utterance: the clients hold their audio ready to send, as the SDK does."""
    return base64.b64encode(data).decode()


class HttpCaller:
    """POST the gateway's JSON to `url_of(scorer)` over keep-alive connections (aiohttp)."""

    def __init__(self, url_of: Callable[[str], str]):
        import aiohttp

        self.url_of = url_of
        # Idle connections are dropped after 3 s, before uvicorn's keep-alive timeout (5 s) closes them under
        # a request: a stack stopped while the others are measured comes back with its timers expired.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
                                             timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))

    async def score(self, scorer: str, items: list[Item]) -> list[Result]:
        body = json.dumps({"items": [to_json(scorer, item, _base64) for item in items]})
        async with self.session.post(self.url_of(scorer), data=body, headers={"Content-Type": "application/json"}) as reply:
            payload = await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {payload[:300]!r}")
        return [{"score": {f: r["score"][f] for f in COMPARED[scorer]}} if r.get("score") is not None
                else {"error": r.get("error")} for r in json.loads(payload)["results"]]

    async def close(self) -> None:
        await self.session.close()


class TritonCaller:
    """Triton's asyncio gRPC client: BYTES tensors [batch, 1] in, one tensor per compared field out."""

    def __init__(self, endpoint: str):
        import tritonclient.grpc.aio as triton

        self.triton = triton
        self.client = triton.InferenceServerClient(endpoint)

    async def score(self, scorer: str, items: list[Item]) -> list[Result]:
        """Requests of at most MAX_BATCH_SIZE items (Triton refuses larger ones), sent together."""
        chunks = [items[i:i + MAX_BATCH_SIZE] for i in range(0, len(items), MAX_BATCH_SIZE)]
        return [r for chunk in await asyncio.gather(*(self._score(scorer, c) for c in chunks)) for r in chunk]

    async def _score(self, scorer: str, items: list[Item]) -> list[Result]:
        inputs = []
        for name in AUDIO_FIELDS[scorer] + TEXT_FIELDS[scorer]:
            values = [item[name] if name in AUDIO_FIELDS[scorer] else item[name].encode() for item in items]
            tensor = self.triton.InferInput(name.upper(), [len(items), 1], "BYTES")
            tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
            inputs.append(tensor)
        reply = await self.client.infer(scorer, inputs, client_timeout=TIMEOUT_S)
        columns = {name: reply.as_numpy(name.upper())[:, 0] for name in [*COMPARED[scorer], "error"]}
        results: list[Result] = []
        for row in range(len(items)):
            error = columns["error"][row].decode()
            if error:
                code, _, message = error.partition(": ")
                results.append({"error": {"code": code, "message": message}})
                continue
            results.append({"score": {name: (columns[name][row].decode() if tolerance == 0 else float(columns[name][row]))
                                      for name, tolerance in COMPARED[scorer].items()}})
        return results

    async def close(self) -> None:
        await self.client.close()


def make_caller(stack: str, endpoint: str) -> Caller:
    """The client of a stack (names as bench/peers.py's STACKS)."""
    if stack == "speechrl-grpc":
        return SdkCaller(json.loads(endpoint))  # one server per scorer
    if stack == "pytriton":
        return TritonCaller(endpoint)
    if stack == "speechrl-http":
        return HttpCaller(lambda scorer: f"{endpoint}/v1/{scorer}/score")
    return HttpCaller(lambda scorer: f"{endpoint}/{scorer}")  # ray, litserve


class Items:
    """bench/scorers.py's i-th item of each scorer, as a plain dict."""

    def __init__(self) -> None:
        self.audio = [path.read_bytes() for path in scorers.speech()]
        self.next = itertools.count()  # timed ops continue the sequence: rule hypotheses stay new text

    def item(self, scorer: str, i: int) -> Item:
        if scorer == "intelligibility":
            return {"audio": self.audio[i % len(self.audio)], "reference_text": scorers._texts(i)}
        if scorer == "speaker":
            return {"audio": self.audio[i % len(self.audio)], "reference_audio": scorers._prompt_speaker(self.audio, i)}
        return {"hypothesis": scorers._hypothesis(i), "reference": scorers._reference(i)}

    def take(self, scorer: str, n: int) -> list[Item]:
        return [self.item(scorer, next(self.next)) for _ in range(n)]


class Timed:
    """What one timed op saw."""

    def __init__(self) -> None:
        self.items = 0
        self.latencies_s: list[float] = []
        self.errors: Counter[str] = Counter()

    async def call(self, caller: Caller, scorer: str, items: list[Item]) -> str:
        """One call; OK, or the kind of its failure (load.run_load's outcome)."""
        started = time.perf_counter()
        try:
            results = await caller.score(scorer, items)
        except Exception as exc:  # noqa: BLE001 - every failure is counted by kind, none stops the run
            self.errors[type(exc).__name__] += 1
            return type(exc).__name__
        failed = [r for r in results if "score" not in r]
        if failed:
            self.errors[f"item {failed[0]['error']}"] += len(failed)
            return "item_error"
        self.latencies_s.append(time.perf_counter() - started)
        self.items += len(items)
        return OK

    def answer(self, seconds: float) -> dict[str, Any]:
        return {"items": self.items, "seconds": seconds, "latencies_s": self.latencies_s, "errors": dict(self.errors)}


async def timed(work: Callable[[Timed], Awaitable[object]]) -> dict[str, Any]:
    record = Timed()
    start = time.perf_counter()
    await work(record)
    return record.answer(time.perf_counter() - start)


async def run(command: dict[str, Any], caller: Caller, items: Items) -> dict[str, Any]:
    scorer, op = command["scorer"], command["op"]
    if op == "check":
        scorers._WORDS_MADE = itertools.count()  # the same hypotheses from every stack's driver
        results = await caller.score(scorer, [items.item(scorer, i) for i in range(command["items"])])
        scorers._WORDS_MADE = itertools.count(command["words_from"])  # then words no other driver sends
        return {"results": results}
    if op == "sequential":
        async def sequential(record: Timed) -> None:
            for _ in range(0, command["items"], command["batch"]):
                await record.call(caller, scorer, items.take(scorer, command["batch"]))
        return await timed(sequential)
    if op == "concurrent":
        left = iter(range(command["items"]))

        async def one_caller(record: Timed) -> None:
            for _ in left:
                await record.call(caller, scorer, items.take(scorer, 1))

        async def concurrent(record: Timed) -> None:
            await asyncio.gather(*(one_caller(record) for _ in range(command["callers"])))
        return await timed(concurrent)
    if op == "load":
        async def load(record: Timed) -> None:
            await run_load(scorer, lambda: record.call(caller, scorer, items.take(scorer, 1)),
                           command["callers"], command["seconds"])
        return await timed(load)
    raise ValueError(f"unknown op {op!r}")


async def serve_commands(stack: str, endpoint: str) -> None:
    caller, items = make_caller(stack, endpoint), Items()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                answer = await run(json.loads(line), caller, items)
            except Exception as exc:  # noqa: BLE001 - the orchestrator reports it and stops
                answer = {"failed": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        await caller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True)
    parser.add_argument("--endpoint", required=True, help="host:port (gRPC), http://host:port, or for speechrl-grpc "
                                                            "a JSON object of host:port by scorer")
    args = parser.parse_args()
    asyncio.run(serve_commands(args.stack, args.endpoint))


if __name__ == "__main__":
    main()

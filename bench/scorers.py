"""Scorer throughput: in-process vs over gRPC at batch 1/8/32, dynamic batching under 32 concurrent
single-item clients, and the ASR scorer's thread/allocator settings.

    python bench/scorers.py [--only rules,speaker,intelligibility] [--quick]

Utterances are espeak-ng speech (about 3 s each). Items come in GRPO groups of 8 samples of one
prompt: rule hypotheses are different transcripts of the group's reference, speaker items compare
different utterances with the group's prompt speaker.

In-process calls the engine's batch function in a process of its own started with the services'
settings (stack.service_env: thread counts, jemalloc), so that it and the server differ only by
gRPC. "gRPC" runs the real server (`speechrl serve`, same settings) and calls it with the asyncio
client, one call after another. The concurrency table sends one item per request from 32 asyncio
clients at once, against a server with max_batch_size 32 (dynamic batching) and one with
max_batch_size 1 (each request alone).

A shared 2-core VM drifts by tens of percent within minutes, so every number is the median of
several rounds and the two sides of each comparison alternate within a round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import write_section
from grpc_health.v1 import health_pb2, health_pb2_grpc

from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
)
from speechrl.services.audio import AudioInput
from speechrl.services.espeak import EspeakSynthesizer
from speechrl.services.ports import free_port
from speechrl.services.stack import JEMALLOC, grpc_healthy, service_env

SENTENCES = [
    "The weather today is sunny with a light breeze.", "Please call Stella and ask her to bring these things.",
    "Reinforcement learning improves speech recognition.", "Open the window because it is too warm in here.",
    "The quick brown fox jumps over the lazy dog.", "We will meet at the station at half past nine.",
    "She sells sea shells by the sea shore.", "Turn on the kitchen lights before dinner.",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland"]
BATCH_SIZES = (1, 8, 32)


@dataclass
class Scorer:
    """How to benchmark one scorer: in-process batch function, and client calls of a batch / of one item."""

    name: str
    items_per_run: int
    build_inproc: Callable[[list[Path]], Callable[[int, int], Any]]
    call_batch: Callable[[Any, list[Path], int, int], Any]
    async_client: type
    call_async: Callable[[Any, list[Path], int], Any]
    rounds: int = 5  # alternating rounds per comparison (the reported numbers are their medians)
    coalesces: bool = False  # the client merges concurrent calls (AsyncRuleRewardsClient's coalesce option)


def _texts(i: int) -> str:
    return SENTENCES[i % len(SENTENCES)]


# Items come as GRPO sends them: groups of GROUP samples of one prompt. Rules: each sample a
# different plausible transcript (one word dropped) of the group's reference. Speaker: each sample
# a different utterance, all compared with the group's prompt speaker.
GROUP = 8


def _reference(i: int) -> str:
    return _texts(i // GROUP)


def _hypothesis(i: int) -> str:
    words = _reference(i).split()
    drop = i % GROUP % len(words)
    return " ".join(words[:drop] + words[drop + 1:])


def _prompt_speaker(wavs: Sequence[Any], i: int) -> Any:
    return wavs[(i // GROUP) % len(wavs)]


def _rules_inproc(wavs: list[Path]) -> Callable[[int, int], Any]:
    from speechrl.services.rules.engine import RuleItem, RuleRewardEngine

    engine = RuleRewardEngine()
    return lambda start, n: engine.score_batch([RuleItem(_hypothesis(i), _reference(i)) for i in range(start, start + n)])


def _speaker_inproc(wavs: list[Path]) -> Callable[[int, int], Any]:
    from speechrl.services.speaker.engine import ScoreItem
    from speechrl.services.speaker.server import SpeakerConfig, build_engine

    engine = build_engine(SpeakerConfig())
    engine.process(list(engine.warm_up_items()))
    audio = [AudioInput(encoded=w.read_bytes()) for w in wavs]
    return lambda start, n: engine.process([ScoreItem(audio[i % len(audio)], _prompt_speaker(audio, i))
                                            for i in range(start, start + n)])


def _asr_inproc(wavs: list[Path]) -> Callable[[int, int], Any]:
    from speechrl.services.intelligibility.engine import IntelligibilityItem
    from speechrl.services.intelligibility.server import IntelligibilityConfig, build_engine

    engine = build_engine(IntelligibilityConfig())
    audio = [AudioInput(encoded=w.read_bytes()) for w in wavs]
    return lambda start, n: engine.score_batch([IntelligibilityItem(audio[i % len(audio)], _texts(i))
                                                for i in range(start, start + n)])


SCORERS = {
    "rules": Scorer("rules", 2048, _rules_inproc,
                    lambda c, w, s, n: c.score([_hypothesis(i) for i in range(s, s + n)],
                                               [_reference(i) for i in range(s, s + n)]),
                    AsyncRuleRewardsClient,
                    lambda c, w, i: c.score([_hypothesis(i)], [_reference(i)]), coalesces=True),
    "speaker": Scorer("speaker", 128, _speaker_inproc,
                      lambda c, w, s, n: c.score([w[i % len(w)] for i in range(s, s + n)],
                                                 [_prompt_speaker(w, i) for i in range(s, s + n)]),
                      AsyncSpeakerClient,
                      lambda c, w, i: c.score([w[i % len(w)]], [_prompt_speaker(w, i)])),
    "intelligibility": Scorer("intelligibility", 32, _asr_inproc,
                              lambda c, w, s, n: c.score([w[i % len(w)] for i in range(s, s + n)],
                                                         [_texts(i) for i in range(s, s + n)]),
                              AsyncIntelligibilityClient,
                              lambda c, w, i: c.score([w[i % len(w)]], [_texts(i)]), rounds=3),
}


def throughput(run_batch: Callable[[int, int], Any], total: int, batch: int) -> float:
    """Items per second over `total` items sent `batch` at a time."""
    start = time.perf_counter()
    for offset in range(0, total, batch):
        run_batch(offset, min(batch, total - offset))
    return total / (time.perf_counter() - start)


def speech() -> list[Path]:
    """The benchmark's utterances (espeak-ng, cached on disk)."""
    synth = EspeakSynthesizer(Path(tempfile.gettempdir()) / "speechrl-bench-speech")
    return [synth.path(text, voice=voice) for voice in VOICES for text in SENTENCES]


def in_process_worker(name: str) -> None:
    """`--in-process-worker NAME`: build the engine, warm it up, then answer "total batch" lines on stdin
    with the in-process items/s on stdout."""
    scorer, wavs = SCORERS[name], speech()
    run_batch = scorer.build_inproc(wavs)
    throughput(run_batch, scorer.items_per_run, 8)  # caches, lazy imports and kernels warm, as in the server
    print("ready", flush=True)
    for line in sys.stdin:
        total, batch = map(int, line.split())
        print(throughput(run_batch, total, batch), flush=True)


class InProcessWorker:
    """The engine in a process of its own, started with the same settings as the server's process."""

    def __init__(self, name: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--in-process-worker", name], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=service_env(dict(os.environ)))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the in-process {name} worker did not start")

    def throughput(self, total: int, batch: int) -> float:
        self.stdin.write(f"{total} {batch}\n")
        self.stdin.flush()
        return float(self.stdout.readline())

    def stop(self) -> None:
        self.stdin.close()
        self.proc.wait(30)


async def remote_throughput(scorer: Scorer, endpoint: str, wavs: list[Path], total: int, batch: int) -> float:
    """throughput() of one client sending `batch` items per call, each call after the last reply.

    The asyncio client: the SDK's core. Its sync wrapper adds a hand-off to its loop thread per call,
    which is the wrapper's cost, not gRPC's.
    """
    async with scorer.async_client(endpoint, timeout_s=600) as client:
        await scorer.call_batch(client, wavs, 0, batch)
        start = time.perf_counter()
        for offset in range(0, total, batch):
            await scorer.call_batch(client, wavs, offset, min(batch, total - offset))
        return total / (time.perf_counter() - start)


async def round_trip_ms(endpoint: str, calls: int = 500) -> float:
    """Median milliseconds of a grpc.health.v1 Check on the server: Python gRPC's own cost of one call
    (client, loopback, server), with no scorer work."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            await check(health_pb2.HealthCheckRequest())
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times[calls // 10:])


class ServerProcess:
    """`speechrl serve NAME` in its own process, as the stack runs it."""

    def __init__(self, name: str, extra_args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "speechrl.services.cli", "serve", name, "--port", str(self.port), *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env if env is not None else service_env(dict(os.environ)))
        deadline = time.monotonic() + 180
        while not grpc_healthy(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.log.name}")
            time.sleep(0.3)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def concurrent_throughput(scorer: Scorer, endpoint: str, wavs: list[Path], total: int, clients: int = 32,
                                **client_options: Any) -> float:
    """Items per second when `clients` tasks share one client and each sends single-item calls until `total`
    are done."""
    async with scorer.async_client(endpoint, timeout_s=600, **client_options) as client:
        await scorer.call_async(client, wavs, 0)
        counter = iter(range(total))

        async def worker() -> None:
            for i in counter:
                results = await scorer.call_async(client, wavs, i)
                results[0].unwrap()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return total / (time.perf_counter() - start)


def alternating_medians(measures: Sequence[Callable[[], float]], rounds: int) -> list[float]:
    """Median of each measurement, taken in turn within every round: a drift of the machine hits all alike."""
    samples: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for measure, taken in zip(measures, samples, strict=True):
            taken.append(measure())
    return [statistics.median(taken) for taken in samples]


def bench_scorer(scorer: Scorer, wavs: list[Path], quick: bool) -> tuple[list[str], list[str], float]:
    """Rows of the batch table and of the concurrency table, and the server's health-check round trip (ms)."""
    total, rounds = scorer.items_per_run // (4 if quick else 1), 2 if quick else scorer.rounds
    rows = []
    local = InProcessWorker(scorer.name)
    server = ServerProcess(scorer.name, ["--max-batch-size", "32"])
    alone_server = ServerProcess(scorer.name, ["--max-batch-size", "1"])
    try:
        asyncio.run(remote_throughput(scorer, server.endpoint, wavs, total, 8))  # the server warm, as the worker
        for batch in BATCH_SIZES:
            in_process, remote = alternating_medians(
                [lambda: local.throughput(total, batch),  # noqa: B023 (called within this iteration)
                 lambda: asyncio.run(remote_throughput(scorer, server.endpoint, wavs, total, batch))],  # noqa: B023
                rounds)
            added_ms = 1e3 * batch * (1 / remote - 1 / in_process)
            rows.append(f"| {scorer.name} | {batch} | {in_process:.1f} | {remote:.1f} | "
                        f"{100 * (in_process / remote - 1):+.1f}% | {added_ms:+.2f} |")
        floor_ms = asyncio.run(round_trip_ms(server.endpoint))
        # The rules client merges concurrent calls into one request unless told not to (coalesce=False):
        # measured apart from the server's batching, and off for "each request alone".
        single = {"coalesce": False} if scorer.coalesces else {}
        measures = [lambda: asyncio.run(concurrent_throughput(scorer, alone_server.endpoint, wavs, total, **single)),
                    lambda: asyncio.run(concurrent_throughput(scorer, server.endpoint, wavs, total, **single))]
        if scorer.coalesces:
            measures.append(lambda: asyncio.run(concurrent_throughput(scorer, server.endpoint, wavs, total)))
        alone, batched, *merged = alternating_medians(measures, rounds)
    finally:
        for process in (local, server, alone_server):
            process.stop()
    with_sdk = f"{merged[0]:.1f} | {merged[0] / alone:.2f}x" if merged else "- | -"
    concurrency = [f"| {scorer.name} | {total} | {alone:.1f} | {batched:.1f} | {batched / alone:.2f}x | {with_sdk} |"]
    return rows, concurrency, floor_ms


def bench_process_settings(wavs: list[Path], quick: bool) -> list[str]:
    """ASR scorer over gRPC at batch 8 under each thread/allocator setting."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF")}
    variants = {
        "library defaults (OpenBLAS threads = cores, glibc malloc)": dict(base),
        "OPENBLAS_NUM_THREADS=1, glibc malloc": {**base, "OPENBLAS_NUM_THREADS": "1"},
        "OPENBLAS_NUM_THREADS=1 + jemalloc returning pages after 60 s, background thread (the earlier setting)":
            {**service_env(base), "MALLOC_CONF": "background_thread:true,dirty_decay_ms:60000,muzzy_decay_ms:60000"},
        "stack settings: OPENBLAS_NUM_THREADS=1 + jemalloc keeping its pages": service_env(base),
    }
    if not os.path.exists(JEMALLOC):
        variants = {k: v for k, v in variants.items() if "jemalloc" not in k}
    scorer = SCORERS["intelligibility"]
    total, rounds = (16, 1) if quick else (32, scorer.rounds)
    servers = {label: ServerProcess("intelligibility", ["--max-batch-size", "8"], env=env)
               for label, env in variants.items()}
    samples: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for _ in range(rounds):  # the settings in turn within each round, as alternating_medians
            for label, server in servers.items():
                samples[label].append(asyncio.run(remote_throughput(scorer, server.endpoint, wavs, total, 8)))
    finally:
        for server in servers.values():
            server.stop()
    return [f"| {label} | {statistics.median(rates):.2f} |" for label, rates in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCORERS), help="comma-separated scorers")
    parser.add_argument("--quick", action="store_true", help="a quarter of the items, two rounds (a smoke run)")
    parser.add_argument("--in-process-worker", metavar="SCORER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process_worker:
        in_process_worker(args.in_process_worker)
        return
    wavs = speech()
    batch_rows, concurrency_rows, floors = [], [], []
    for name in args.only.split(","):
        print(f"benchmarking {name} ...", flush=True)
        rows, concurrency, floor_ms = bench_scorer(SCORERS[name], wavs, args.quick)
        batch_rows += rows
        concurrency_rows += concurrency
        floors.append(f"{name} {floor_ms:.2f} ms")
    settings = bench_process_settings(wavs, args.quick) if "intelligibility" in args.only else []
    body = "\n".join([
        "Throughput in items per second (an item is one utterance, one voice pair, or one hypothesis), the median "
        "of alternating rounds. Items come in GRPO groups of 8 samples sharing a reference text / prompt speaker, "
        "and a batch does shared work once, in-process and in the server alike. In-process runs in its own process "
        "with the services' settings; gRPC calls go through the asyncio client, one after another.",
        "", "| scorer | batch | in-process | over gRPC | gRPC overhead | gRPC time per call (ms) |",
        "|---|---|---|---|---|---|", *batch_rows,
        "", "Python gRPC's own cost of one call on this machine (client, loopback and server; median round trip of a "
        "grpc.health.v1 Check on the same server, no scorer work): " + ", ".join(floors) + ".",
        "", "32 concurrent clients (asyncio tasks sharing one client object), one item per call. Each request "
        "alone: server max_batch_size 1. Server batching: max_batch_size 32, one request per call. With SDK "
        "coalescing: the rules client also merges the calls pending in one event-loop iteration into one request "
        "(its default; coalesce=False for the other two columns).", "",
        "| scorer | items | each request alone | server dynamic batching | gain | + SDK coalescing | gain |",
        "|---|---|---|---|---|---|---|", *concurrency_rows,
    ])
    if settings:
        body += "\n\nASR scorer over gRPC, batch 8, by process settings (items/s):\n\n| settings | items/s |\n|---|---|\n"
        body += "\n".join(settings)
    write_section("scorers", "Scorer throughput (bench/scorers.py)", body)


if __name__ == "__main__":
    main()

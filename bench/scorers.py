"""Scorer throughput: in-process vs the server's batching path without gRPC vs over gRPC at batch
1/8/32, dynamic batching under 32 concurrent single-item clients, and the ASR scorer's thread/allocator
settings.

    python bench/scorers.py [--only rules,speaker,intelligibility] [--quick]

Utterances are espeak-ng speech (about 3 s each). Items come in GRPO groups of 8 samples of one
prompt: rule hypotheses are different transcripts of the group's reference (each one new text, as
rollouts are, while references recur), speaker items compare different utterances with the group's
prompt speaker.

The batch table measures each scorer three ways, on the same items, each in a process of its own
started with the services' settings (stack.service_env: thread counts, jemalloc):

- in-process: the engine's batch function called directly, one batch after another;
- server path without gRPC: the same engine behind the DynamicBatcher its server puts in front of
  it (the server's max_batch_size, max_wait_ms and queue bound; inline on the event loop for the
  rules, the model thread otherwise), `await batcher.submit(items)` one batch after another from
  an asyncio loop. It differs from in-process by the server's batching path, and from gRPC by gRPC
  (with the servicer's proto translation and the client);
- over gRPC: the real server (`speechrl serve`) called by the asyncio client, one call after another.
  The client sends the WAV bytes held in memory, as the in-process items hold them, and runs with
  the services' process settings (jemalloc), as the stack's own clients (trainer, gateway) do: the
  script re-runs itself with them.

The breakdown table splits one batch-8 gRPC call with the server's own Prometheus metrics (its
/metrics port): time in the call's handler, of which in the batch function, against the batch
function's time in-process; the rest of the call is gRPC and the client.

The concurrency table sends one item per request from 32 asyncio clients at once, against a server
with max_batch_size 32 (dynamic batching) and one with max_batch_size 1 (each request alone).

A shared 2-core VM drifts by tens of percent within minutes, so every number is the median of
several rounds and the sides of each comparison alternate within a round.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(__file__))
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sections import write_section

from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
)
from speechrl.services.audio import AudioInput
from speechrl.services.batching import DynamicBatcher, model_thread
from speechrl.services.config import parse_config
from speechrl.services.errors import ItemFailure
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
BREAKDOWN_BATCH = 8  # the batch size whose gRPC calls the breakdown table splits (the target is at 8)
# Flags of the server compared with in-process (max_batch_size 32 is ServerConfig's default). The
# batcher-only worker parses the same flags, and the same SPEECHRL_<SERVICE>_* variables, into its config.
SERVER_ARGS = ("--max-batch-size", "32")
# The variables of the process-settings table: each variant sets its own.
PROCESS_SETTINGS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF")


@dataclass
class Engine:
    """A scorer's engine, built in this process as its server builds it."""

    process: Callable[[list[Any]], Sequence[Any]]  # the batch function: one result or ItemFailure per item
    item: Callable[[int], Any]  # the benchmark's i-th item as the engine takes it (what the gRPC path sends)
    # `process` behind a DynamicBatcher as the server's start() sets it, on the model thread the engine was built on
    batcher: Callable[[ThreadPoolExecutor], DynamicBatcher[Any, Any]]

    def items(self, start: int, n: int) -> list[Any]:
        """Items start .. start + n - 1."""
        return [self.item(i) for i in range(start, start + n)]


@dataclass
class Scorer:
    """How to benchmark one scorer: its engine in this process, and client calls of a batch / of one item."""

    name: str
    items_per_run: int
    build_engine: Callable[[list[Path]], Engine]
    call_batch: Callable[[Any, list[bytes], int, int], Any]
    async_client: type
    call_async: Callable[[Any, list[bytes], int], Any]
    rounds: int = 5  # alternating rounds per comparison (the reported numbers are their medians)
    coalesces: bool = False  # the client merges concurrent calls (AsyncRuleRewardsClient's coalesce option)


def _texts(i: int) -> str:
    return SENTENCES[i % len(SENTENCES)]


# Items come as GRPO sends them: groups of GROUP samples of one prompt. Rules: each sample a
# different plausible transcript of the group's reference, one word misheard as a word never made
# before, so that no hypothesis repeats over the run (rollouts are new text, references recur; the
# scorers remember normalised texts, which would otherwise time a cache). Speaker: each sample
# a different utterance, all compared with the group's prompt speaker.
GROUP = 8
_WORDS_MADE = itertools.count()


def _reference(i: int) -> str:
    return _texts(i // GROUP)


def _new_word() -> str:
    """A letters-only word this process has not made before (normalisation leaves it whole)."""
    n, letters = next(_WORDS_MADE), ""
    while True:
        n, digit = divmod(n, 26)
        letters += chr(ord("a") + digit)
        if n == 0:
            return "zq" + letters


def _hypothesis(i: int) -> str:
    words = _reference(i).split()
    misheard = i % GROUP % len(words)
    return " ".join([*words[:misheard], _new_word(), *words[misheard + 1:]])


def _prompt_speaker(wavs: Sequence[Any], i: int) -> Any:
    return wavs[(i // GROUP) % len(wavs)]


def _rules_engine(wavs: list[Path]) -> Engine:
    from speechrl.services.rules.engine import RuleItem, RuleRewardEngine
    from speechrl.services.rules.server import RulesConfig

    config = parse_config(RulesConfig, "rules", SERVER_ARGS)
    engine = RuleRewardEngine(config.max_text_chars)
    return Engine(engine.score_batch, lambda i: RuleItem(_hypothesis(i), _reference(i)),
                  lambda thread: DynamicBatcher.configured(engine.score_batch, config, "rules", inline=True,
                                                           executor=thread))  # as rules/server.py


def _speaker_engine(wavs: list[Path]) -> Engine:
    from speechrl.services.residency import make_guard
    from speechrl.services.speaker.engine import ScoreItem
    from speechrl.services.speaker.server import SpeakerConfig, build_engine

    config = parse_config(SpeakerConfig, "speaker", SERVER_ARGS)
    engine = build_engine(config)
    engine.process(list(engine.warm_up_items()))
    audio = [AudioInput(encoded=w.read_bytes()) for w in wavs]
    return Engine(engine.process, lambda i: ScoreItem(audio[i % len(audio)], _prompt_speaker(audio, i)),
                  lambda thread: DynamicBatcher.configured(
                      engine.process, config, "speaker", executor=thread,
                      guard=make_guard(config, engine.backend, owner=f"speaker-{os.getpid()}")))


def _asr_engine(wavs: list[Path]) -> Engine:
    from speechrl.services.intelligibility.engine import IntelligibilityItem
    from speechrl.services.intelligibility.server import IntelligibilityConfig, build_engine
    from speechrl.services.residency import make_guard

    config = parse_config(IntelligibilityConfig, "intelligibility", SERVER_ARGS)
    engine = build_engine(config)
    audio = [AudioInput(encoded=w.read_bytes()) for w in wavs]
    return Engine(engine.score_batch, lambda i: IntelligibilityItem(audio[i % len(audio)], _texts(i)),
                  lambda thread: DynamicBatcher.configured(
                      engine.score_batch, config, "intelligibility", executor=thread,
                      guard=make_guard(config, engine.backend, owner=f"intelligibility-{os.getpid()}")))


SCORERS = {
    "rules": Scorer("rules", 2048, _rules_engine,
                    lambda c, w, s, n: c.score([_hypothesis(i) for i in range(s, s + n)],
                                               [_reference(i) for i in range(s, s + n)]),
                    AsyncRuleRewardsClient,
                    lambda c, w, i: c.score([_hypothesis(i)], [_reference(i)]), coalesces=True),
    "speaker": Scorer("speaker", 128, _speaker_engine,
                      lambda c, w, s, n: c.score([w[i % len(w)] for i in range(s, s + n)],
                                                 [_prompt_speaker(w, i) for i in range(s, s + n)]),
                      AsyncSpeakerClient,
                      lambda c, w, i: c.score([w[i % len(w)]], [_prompt_speaker(w, i)])),
    "intelligibility": Scorer("intelligibility", 32, _asr_engine,
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


async def batcher_throughput(batcher: DynamicBatcher[Any, Any], engine: Engine, total: int, batch: int) -> float:
    """throughput() through the server's batching path: each batch submitted once the last one is
    answered, as the servicer does for one client's calls."""
    start = time.perf_counter()
    for offset in range(0, total, batch):
        await batcher.submit(engine.items(offset, min(batch, total - offset)))
    return total / (time.perf_counter() - start)


def in_process_worker(name: str, via_batcher: bool) -> None:
    """`--in-process-worker NAME [--via-batcher]`: build the engine, warm it up, then answer "total batch"
    lines on stdin with items/s on stdout: of the engine's batch function called directly, or with
    --via-batcher of `await batcher.submit(items)` on the server's DynamicBatcher in one asyncio loop."""
    scorer, wavs = SCORERS[name], speech()
    if via_batcher:  # built and run on one model thread, as the server does (batching.model_thread)
        thread = model_thread(name)
        engine = thread.submit(scorer.build_engine, wavs).result()
        batcher, loop = engine.batcher(thread), asyncio.new_event_loop()
    else:
        engine, batcher, loop = scorer.build_engine(wavs), None, None

    def score(start: int, n: int) -> Sequence[Any]:
        if batcher is None or loop is None:
            return engine.process(engine.items(start, n))
        return loop.run_until_complete(batcher.submit(engine.items(start, n)))

    def measure(total: int, batch: int) -> float:
        if batcher is None or loop is None:
            return throughput(score, total, batch)
        # One loop for the worker's life: the batcher's queue and worker task belong to it.
        return loop.run_until_complete(batcher_throughput(batcher, engine, total, batch))

    failed = [r for r in score(0, GROUP) if isinstance(r, ItemFailure)]
    if failed:  # a failing item is fast and would pass for throughput
        raise RuntimeError(f"{name}: {len(failed)} of {GROUP} benchmark items failed, e.g. {failed[0]!r}")
    measure(scorer.items_per_run, 8)  # caches, lazy imports and kernels warm, as in the server
    print("ready", flush=True)
    for line in sys.stdin:
        total, batch = map(int, line.split())
        print(measure(total, batch), flush=True)
    if batcher is not None and loop is not None:
        batcher.close()
        loop.run_until_complete(asyncio.sleep(0))  # let the cancelled batcher task finish
        loop.close()


class InProcessWorker:
    """The engine in a process of its own, started with the same settings as the server's process;
    via_batcher: behind the server's DynamicBatcher in an asyncio loop (the server path without gRPC)."""

    def __init__(self, name: str, via_batcher: bool = False):
        mode = ["--via-batcher"] if via_batcher else []
        self.proc = subprocess.Popen([sys.executable, __file__, "--in-process-worker", name, *mode], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=service_env(dict(os.environ)))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the in-process {name} worker{' (via the batcher)' if via_batcher else ''} did not start")

    def throughput(self, total: int, batch: int) -> float:
        self.stdin.write(f"{total} {batch}\n")
        self.stdin.flush()
        return float(self.stdout.readline())

    def stop(self) -> None:
        self.stdin.close()
        self.proc.wait(30)


class KeptClients:
    """An event loop and the SDK clients the benchmark calls through, kept open between measurements as a
    trainer keeps its channels: a new connection starts with small HTTP/2 windows and cold buffers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._clients: dict[tuple[str, str, bool | None], Any] = {}

    def client(self, scorer: Scorer, endpoint: str, coalesce: bool | None = None) -> Any:
        """The scorer's asyncio client of endpoint; coalesce: the rules client's option (None: its default)."""
        key = (scorer.name, endpoint, coalesce)
        if key not in self._clients:
            options = {} if coalesce is None else {"coalesce": coalesce}
            self._clients[key] = scorer.async_client(endpoint, timeout_s=600, **options)
        return self._clients[key]

    def run(self, work: Coroutine[Any, Any, float]) -> float:
        return self.loop.run_until_complete(work)

    def close(self) -> None:
        for client in self._clients.values():
            self.loop.run_until_complete(client.close())
        self.loop.close()


async def remote_throughput(scorer: Scorer, client: Any, audio: list[bytes], total: int, batch: int) -> float:
    """throughput() of one client sending `batch` items per call, each call after the last reply.

    The asyncio client: the SDK's core. Its sync wrapper adds a hand-off to its loop thread per call,
    which is the wrapper's cost, not gRPC's.
    """
    await scorer.call_batch(client, audio, 0, batch)
    start = time.perf_counter()
    for offset in range(0, total, batch):
        await scorer.call_batch(client, audio, offset, min(batch, total - offset))
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
        self.port, self.metrics_port = free_port(), free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "speechrl.services.cli", "serve", name, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), *extra_args]
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

    def timings(self) -> dict[str, float]:
        """The server's cumulative Prometheus counts: calls answered and seconds in their handlers
        (every method but health and status), and seconds in the batch function."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        wanted = {"speechrl_grpc_request_seconds_count": "calls", "speechrl_grpc_request_seconds_sum": "handler_s",
                  "speechrl_batch_seconds_sum": "batch_s"}
        totals = dict.fromkeys(wanted.values(), 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and "Status" not in sample.labels.get("method", ""):
                    totals[wanted[sample.name]] += sample.value
        return totals

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def concurrent_throughput(scorer: Scorer, client: Any, audio: list[bytes], total: int, tasks: int = 32) -> float:
    """Items per second when `tasks` asyncio tasks share one client and each sends single-item calls until
    `total` are done."""
    await scorer.call_async(client, audio, 0)
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            results = await scorer.call_async(client, audio, i)
            results[0].unwrap()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return total / (time.perf_counter() - start)


def alternating_medians(measures: Sequence[Callable[[], float]], rounds: int) -> list[float]:
    """Median of each measurement, taken in turn within every round: a drift of the machine hits all alike.
    Each round starts one further along, so that no measurement always follows the same one (or always
    comes first, after whatever ran before the rounds)."""
    samples: list[list[float]] = [[] for _ in measures]
    for r in range(rounds):
        for i in range(len(measures)):
            index = (r + i) % len(measures)
            samples[index].append(measures[index]())
    return [statistics.median(taken) for taken in samples]


@dataclass
class CallBreakdown:
    """Where the time of the server's calls went, from its metrics, over the measurements taken with `around`."""

    server: ServerProcess
    batch: int
    # Per measurement, ms per call: the call (client side), the server's handler, the batch function.
    rounds: list[tuple[float, float, float]] = field(default_factory=list)

    def around(self, measure: Callable[[], float]) -> Callable[[], float]:
        """measure (items/s of calls of `batch` items), with the server's time per call over its run recorded."""
        def measured() -> float:
            before = self.server.timings()
            rate = measure()
            after = self.server.timings()
            calls = after["calls"] - before["calls"]
            self.rounds.append((1e3 * self.batch / rate, 1e3 * (after["handler_s"] - before["handler_s"]) / calls,
                                1e3 * (after["batch_s"] - before["batch_s"]) / calls))
            return rate
        return measured

    def row(self, name: str, in_process: float) -> str:
        """in_process: items/s of the batch function alone. Each part is the median over the rounds of
        that part, taken within each round (medians of the totals would not add up)."""
        def median(part: Callable[[float, float, float], float]) -> float:
            return statistics.median(part(*r) for r in self.rounds)
        alone = 1e3 * self.batch / in_process
        return (f"| {name} | {alone:.2f} | {median(lambda c, h, b: c):.2f} | {median(lambda c, h, b: h):.2f} "
                f"| {median(lambda c, h, b: b):.2f} | {median(lambda c, h, b: b) - alone:+.2f} "
                f"| {median(lambda c, h, b: h - b):.2f} | {median(lambda c, h, b: c - h):.2f} |")


def batch_row(name: str, batch: int, rates: Sequence[float], floor_ms: float) -> str:
    """One row of the batch table: the three rates (in-process, server path without gRPC, over gRPC; items/s),
    then what the batching path and gRPC each add.

    An overhead is one path's time per item over that of the path before it, less 1: batching path adds
    and gRPC adds multiply to the total ((1 + a)(1 + b) = 1 + total).
    """
    in_process, without_grpc, remote = rates

    def adds(fast: float, slow: float) -> str:
        return f"{100 * (fast / slow - 1):+.1f}%"

    def per_call_ms(fast: float, slow: float) -> str:
        return f"{1e3 * batch * (1 / slow - 1 / fast):+.2f}"

    return (f"| {name} | {batch} | {in_process:.1f} | {without_grpc:.1f} | {remote:.1f} | "
            f"{adds(in_process, without_grpc)} | {adds(without_grpc, remote)} | {adds(in_process, remote)} | "
            f"{per_call_ms(in_process, remote)} | {per_call_ms(without_grpc, remote)} | {floor_ms:.2f} |")


def bench_scorer(scorer: Scorer, audio: list[bytes], quick: bool) -> tuple[list[str], str, list[str]]:
    """Rows of the batch table, the breakdown row and the rows of the concurrency table."""
    total, rounds = scorer.items_per_run // (4 if quick else 1), 2 if quick else scorer.rounds
    rates: list[tuple[int, list[float]]] = []  # (batch, medians of the three paths)
    local = InProcessWorker(scorer.name)
    batched_local = InProcessWorker(scorer.name, via_batcher=True)
    server = ServerProcess(scorer.name, SERVER_ARGS)
    alone_server = ServerProcess(scorer.name, ["--max-batch-size", "1"])
    breakdown = CallBreakdown(server, BREAKDOWN_BATCH)
    kept = KeptClients()
    client = kept.client(scorer, server.endpoint)
    try:
        kept.run(remote_throughput(scorer, client, audio, total, 8))  # the server warm, as the workers
        for batch in BATCH_SIZES:
            remote = lambda: kept.run(remote_throughput(scorer, client, audio, total, batch))  # noqa: B023, E731 (called within this iteration)
            rates.append((batch, alternating_medians(
                [lambda: local.throughput(total, batch),  # noqa: B023
                 lambda: batched_local.throughput(total, batch),  # noqa: B023
                 breakdown.around(remote) if batch == BREAKDOWN_BATCH else remote],
                rounds)))
        floor_ms = asyncio.run(round_trip_ms(server.endpoint))
        # The rules client merges concurrent calls into one request unless told not to (coalesce=False):
        # measured apart from the server's batching, and off for "each request alone".
        single = False if scorer.coalesces else None
        measures = [lambda: kept.run(concurrent_throughput(scorer, kept.client(scorer, alone_server.endpoint, single), audio, total)),
                    lambda: kept.run(concurrent_throughput(scorer, kept.client(scorer, server.endpoint, single), audio, total))]
        if scorer.coalesces:
            measures.append(lambda: kept.run(concurrent_throughput(scorer, kept.client(scorer, server.endpoint, True), audio, total)))
        alone, batched, *merged = alternating_medians(measures, rounds)
    finally:
        kept.close()
        for process in (local, batched_local, server, alone_server):
            process.stop()
    rows = [batch_row(scorer.name, batch, medians, floor_ms) for batch, medians in rates]
    with_sdk = f"{merged[0]:.1f} | {merged[0] / alone:.2f}x" if merged else "- | -"
    concurrency = [f"| {scorer.name} | {total} | {alone:.1f} | {batched:.1f} | {batched / alone:.2f}x | {with_sdk} |"]
    return rows, breakdown.row(scorer.name, dict(rates)[BREAKDOWN_BATCH][0]), concurrency


def bench_process_settings(audio: list[bytes], quick: bool) -> list[str]:
    """ASR scorer over gRPC at batch 8 under each thread/allocator setting."""
    base = {k: v for k, v in os.environ.items() if k not in PROCESS_SETTINGS}
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
    kept = KeptClients()
    samples: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for _ in range(rounds):  # the settings in turn within each round, as alternating_medians
            for label, server in servers.items():
                client = kept.client(scorer, server.endpoint)
                samples[label].append(kept.run(remote_throughput(scorer, client, audio, total, 8)))
    finally:
        kept.close()
        for server in servers.values():
            server.stop()
    return [f"| {label} | {statistics.median(rates):.2f} |" for label, rates in samples.items()]


def as_a_stack_client() -> None:
    """Re-run this script with the services' process settings unless it has them: its gRPC clients then
    run as the stack's own clients (the trainer, the gateway) do, with jemalloc. Under glibc's default
    malloc, each 1 MB request is built in freshly mapped pages (page faults on every copy)."""
    env = service_env(dict(os.environ))
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCORERS), help="comma-separated scorers")
    parser.add_argument("--quick", action="store_true", help="a quarter of the items, two rounds (a smoke run)")
    parser.add_argument("--in-process-worker", metavar="SCORER", help=argparse.SUPPRESS)
    parser.add_argument("--via-batcher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process_worker:
        in_process_worker(args.in_process_worker, args.via_batcher)
        return
    as_a_stack_client()
    # The clients send the WAV bytes held in memory, as the in-process items hold them: reading the
    # files on every call would charge disk reads to gRPC.
    audio = [path.read_bytes() for path in speech()]
    batch_rows, breakdown_rows, concurrency_rows = [], [], []
    for name in args.only.split(","):
        print(f"benchmarking {name} ...", flush=True)
        rows, breakdown, concurrency = bench_scorer(SCORERS[name], audio, args.quick)
        batch_rows += rows
        breakdown_rows.append(breakdown)
        concurrency_rows += concurrency
    settings = bench_process_settings(audio, args.quick) if "intelligibility" in args.only else []
    body = "\n".join([
        "Throughput in items per second (an item is one utterance, one voice pair, or one hypothesis), the median "
        "of alternating rounds (in-process, server path without gRPC, over gRPC, in turn). Items come in GRPO "
        "groups of 8 samples sharing a reference text / prompt speaker; every rule hypothesis is new text, and "
        "normalised texts are remembered across calls (a group's reference is normalised once), and a batch does "
        "other shared work once (a group's prompt speaker), in-process and in the server alike. All three score the same items, each in its own process with the "
        "services' settings. In-process: the engine's batch function called directly. Server path without gRPC: "
        "the same engine behind the DynamicBatcher its server builds (max_batch_size 32, the server's max_wait_ms; "
        "inline on the event loop for the rules, a model thread for the others), `await batcher.submit(items)` "
        "one batch after another in an asyncio loop. Over gRPC: the real server called through the asyncio client, "
        "one call after another.",
        "", "Batching path adds: the batcher path's time per item over in-process's, less 1. gRPC adds: gRPC's over "
        "the batcher path's (gRPC itself, the servicer's proto translation and the client); the two multiply to "
        "the total overhead. Time added per call: gRPC's time per call less in-process's; of which gRPC: less the "
        "batcher path's. Health check: Python gRPC's own cost of one call "
        "on this machine (client, loopback and server; median round trip of a grpc.health.v1 Check on the same "
        "server, no scorer work).",
        "", "| scorer | batch | in-process | server path without gRPC | over gRPC | batching path adds | gRPC adds "
        "| total overhead | time added per call (ms) | of which gRPC (ms) | health check (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *batch_rows,
        "", f"Where one gRPC call at batch {BREAKDOWN_BATCH} spends its time, in ms per call (each part the median "
        "over the gRPC rounds above of that part within a round; the server's side from its own Prometheus "
        "metrics). Batch function in the server less in-process: the same batch function, on the same items, "
        "slower or faster inside the server process. Servicer and batcher: the "
        "handler's time outside the batch function (proto translation, queueing, the interceptor). gRPC and client: "
        "the call's time outside the server's handler (the client, both gRPC stacks, loopback).",
        "", "| scorer | in-process batch | gRPC call | server handler | of which batch function | batch function "
        "less in-process | servicer and batcher | gRPC and client |",
        "|---|---|---|---|---|---|---|---|", *breakdown_rows,
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

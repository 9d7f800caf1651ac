"""Scorer throughput: in-process vs over gRPC at batch 1/8/32, dynamic batching under 32 concurrent
single-item clients, and the ASR scorer's thread/allocator settings.

    python bench/scorers.py [--only rules,speaker,intelligibility] [--quick]

Utterances are espeak-ng speech (about 3 s each). Items come in GRPO groups of 8 samples of one
prompt: rule hypotheses are different transcripts of the group's reference, speaker items compare
different utterances with the group's prompt speaker. In-process calls the engine's batch function
directly; "gRPC" runs the real server as a separate process (`speechrl serve`, with the stack's
process settings) and calls it with the asyncio client, one call after another; the concurrency table sends one item per
request from 32 asyncio clients at once, against a server with max_batch_size 32 (dynamic
batching) and with max_batch_size 1 (each request alone).
"""

from __future__ import annotations

import argparse
import asyncio
import os

# The in-process measurements run in this process: give it the services' thread settings (see
# speechrl.services.stack.service_env) before numpy and torch load, or it measures oversubscription.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import write_section

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
                    lambda c, w, i: c.score([_hypothesis(i)], [_reference(i)])),
    "speaker": Scorer("speaker", 128, _speaker_inproc,
                      lambda c, w, s, n: c.score([w[i % len(w)] for i in range(s, s + n)],
                                                 [_prompt_speaker(w, i) for i in range(s, s + n)]),
                      AsyncSpeakerClient,
                      lambda c, w, i: c.score([w[i % len(w)]], [_prompt_speaker(w, i)])),
    "intelligibility": Scorer("intelligibility", 32, _asr_inproc,
                              lambda c, w, s, n: c.score([w[i % len(w)] for i in range(s, s + n)],
                                                         [_texts(i) for i in range(s, s + n)]),
                              AsyncIntelligibilityClient,
                              lambda c, w, i: c.score([w[i % len(w)]], [_texts(i)])),
}


def throughput(run_batch: Callable[[int, int], Any], total: int, batch: int) -> float:
    """Items per second over `total` items sent `batch` at a time (one warm-up batch first)."""
    run_batch(0, batch)
    start = time.perf_counter()
    for offset in range(0, total, batch):
        run_batch(offset, min(batch, total - offset))
    return total / (time.perf_counter() - start)


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


async def concurrent_throughput(scorer: Scorer, endpoint: str, wavs: list[Path], total: int, clients: int = 32) -> float:
    """Items per second when `clients` tasks each send single-item requests until `total` are done."""
    async with scorer.async_client(endpoint, timeout_s=600) as client:
        await scorer.call_async(client, wavs, 0)
        counter = iter(range(total))

        async def worker() -> None:
            for i in counter:
                results = await scorer.call_async(client, wavs, i)
                results[0].unwrap()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return total / (time.perf_counter() - start)


def bench_scorer(scorer: Scorer, wavs: list[Path], quick: bool) -> tuple[list[str], list[str]]:
    total = scorer.items_per_run // (4 if quick else 1)
    # In-process first: once a gRPC channel exists, its poller thread competes for this process's GIL
    # and would slow the in-process numbers (and flatter the gRPC overhead).
    inproc = scorer.build_inproc(wavs)
    local = {batch: throughput(inproc, total, batch) for batch in BATCH_SIZES}
    rows = []
    server = ServerProcess(scorer.name, ["--max-batch-size", "32"])
    try:
        for batch in BATCH_SIZES:
            remote = asyncio.run(remote_throughput(scorer, server.endpoint, wavs, total, batch))
            rows.append(f"| {scorer.name} | {batch} | {local[batch]:.1f} | {remote:.1f} | "
                        f"{100 * (local[batch] / remote - 1):+.1f}% |")
        batched = asyncio.run(concurrent_throughput(scorer, server.endpoint, wavs, total))
    finally:
        server.stop()
    alone_server = ServerProcess(scorer.name, ["--max-batch-size", "1"])
    try:
        alone = asyncio.run(concurrent_throughput(scorer, alone_server.endpoint, wavs, total))
    finally:
        alone_server.stop()
    concurrency = [f"| {scorer.name} | {total} | {alone:.1f} | {batched:.1f} | {batched / alone:.2f}x |"]
    return rows, concurrency


def bench_process_settings(wavs: list[Path], quick: bool) -> list[str]:
    """ASR scorer over gRPC at batch 8 under each thread/allocator setting."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF")}
    variants = {
        "library defaults (OpenBLAS threads = cores, glibc malloc)": dict(base),
        "OPENBLAS_NUM_THREADS=1, glibc malloc": {**base, "OPENBLAS_NUM_THREADS": "1"},
        "stack settings: OPENBLAS_NUM_THREADS=1 + jemalloc": service_env(base),
    }
    if not os.path.exists(JEMALLOC):
        variants.pop("stack settings: OPENBLAS_NUM_THREADS=1 + jemalloc")
    scorer = SCORERS["intelligibility"]
    total = 16 if quick else 32
    rows = []
    for label, env in variants.items():
        server = ServerProcess("intelligibility", ["--max-batch-size", "8"], env=env)
        try:
            rate = asyncio.run(remote_throughput(scorer, server.endpoint, wavs, total, 8))
        finally:
            server.stop()
        rows.append(f"| {label} | {rate:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCORERS), help="comma-separated scorers")
    parser.add_argument("--quick", action="store_true", help="a quarter of the items (a smoke run)")
    args = parser.parse_args()
    synth = EspeakSynthesizer(Path(tempfile.gettempdir()) / "speechrl-bench-speech")
    wavs = [synth.path(text, voice=voice) for voice in VOICES for text in SENTENCES]
    batch_rows, concurrency_rows = [], []
    for name in args.only.split(","):
        print(f"benchmarking {name} ...", flush=True)
        rows, concurrency = bench_scorer(SCORERS[name], wavs, args.quick)
        batch_rows += rows
        concurrency_rows += concurrency
    settings = bench_process_settings(wavs, args.quick) if "intelligibility" in args.only else []
    body = "\n".join([
        "Throughput in items per second (an item is one utterance, one voice pair, or one hypothesis). Items come "
        "in GRPO groups of 8 samples sharing a reference text / prompt speaker, and a batch does shared work once, "
        "in-process and in the server alike. gRPC calls go through the asyncio client, one after another.",
        "", "| scorer | batch | in-process | over gRPC | gRPC overhead |", "|---|---|---|---|---|", *batch_rows,
        "", "32 concurrent clients, one item per request:", "",
        "| scorer | items | each request alone (max batch 1) | dynamic batching (max batch 32) | gain |",
        "|---|---|---|---|---|", *concurrency_rows,
    ])
    if settings:
        body += "\n\nASR scorer over gRPC, batch 8, by process settings (items/s):\n\n| settings | items/s |\n|---|---|\n"
        body += "\n".join(settings)
    write_section("scorers", "Scorer throughput (bench/scorers.py)", body)


if __name__ == "__main__":
    main()

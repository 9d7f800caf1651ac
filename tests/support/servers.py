"""Real servers for tests: a grpc.aio server or uvicorn app on its own loop thread, a private redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from speechrl.services.espeak import EspeakSynthesizer
from speechrl.services.ports import free_port
from speechrl.services.server import RunningServer


@contextmanager
def serve_in_thread(start: Callable[[], Awaitable[RunningServer]]) -> Iterator[RunningServer]:
    """Run a real grpc.aio server (built by the coroutine function `start`) on its own loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=300)
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


Speech = EspeakSynthesizer  # the type of the `speech` fixture, for annotations


@contextmanager
def uvicorn_in_thread(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class RedisServer:
    """A private redis-server on a free port, for tests that stop, restart or flush Redis."""

    def __init__(self, workdir: Path, appendonly: bool = False):
        self.workdir = workdir
        self.appendonly = appendonly  # persist every write (fsync always), to test restarts that keep data
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server did not start on port {self.port}")

    def declare_clean(self) -> None:
        """Tell the GPU lease this server started empty, so it skips its post-restart quiet period
        (a restart by stop()/start() gets the quiet period again: it is a new run)."""
        import redis

        from speechrl.services.lease import declare_clean_start

        declare_clean_start(redis.Redis(port=self.port))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

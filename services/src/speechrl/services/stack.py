"""The local stack: `speechrl up` starts Redis (when none answers) and every service, waits until
all are healthy and prints where they are; `speechrl down` stops them; `speechrl status` reports.

State lives under SPEECHRL_HOME (default ./.speechrl): pid files in run/, logs in logs/.

`speechrl up --rollout-backend vllm` runs the rollout service on vLLM. vLLM pins its own torch,
transformers and numpy, so it lives in an environment of its own (scripts/bootstrap.sh makes
.venv-vllm beside .venv, with speechrl's client and services installed); the rollout service is
started with that environment's Python (SPEECHRL_VLLM_PYTHON names another), every other service
and the trainer with this one.
Each service reads its own SPEECHRL_<SERVICE>_* variables; the stack adds the process-level
settings that must be set before Python starts (thread counts, allocator), see `service_env`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from speechrl.services.ports import DEFAULT_PORTS, port_answers, port_holder

# Every `speechrl serve` service, in start order: the gateway last, since its readiness needs the scorers.
STACK_SERVICES = ("rules", "intelligibility", "speaker", "encoder", "rollout", "token2wav", "trainer", "gateway")
# How `up` and `status` check health: these answer HTTP 200 on this path when ready (the gateway once
# its scorers serve, the trainer once its job store in Redis answers); the others, gRPC health.
HTTP_READY_PATHS = {"gateway": "/readyz", "trainer": "/readyz"}
# Services with a Redis (the GPU lease, the trainer's jobs): `up` points them at the stack's Redis.
REDIS_CLIENTS = ("intelligibility", "speaker", "encoder", "rollout", "token2wav", "trainer")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# Freed pages are kept, never returned to the OS (decay -1), and no background purging thread: the
# ASR scorer re-allocates the same large buffers every batch. Measured (bench/RESULTS.md): with 60 s
# decay and a background thread jemalloc was no faster than glibc; retaining pages is ~40% faster.
# The cost is that a service's resident memory stays at its peak.
JEMALLOC_CONF = "background_thread:false,dirty_decay_ms:-1,muzzy_decay_ms:-1"


@dataclass(frozen=True)
class StackPaths:
    """Where the stack keeps pid files and logs."""

    home: Path

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def service_port(name: str, environ: Mapping[str, str] | None = None) -> int:
    """The port a stack service listens on: SPEECHRL_<NAME>_PORT or the default."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return int(env.get(f"SPEECHRL_{name.upper()}_PORT") or DEFAULT_PORTS[name])


def redis_url(environ: Mapping[str, str] | None = None) -> str:
    """The Redis every component uses: SPEECHRL_REDIS_URL or the local default."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return env.get("SPEECHRL_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_env(base: dict[str, str]) -> dict[str, str]:
    """Process settings for a service, set deliberately (measured in bench/RESULTS.md).

    On a small CPU box numpy's OpenBLAS threads fight CTranslate2/torch OpenMP threads for the same
    cores, and glibc malloc returns and re-faults the model's large buffers each batch: one
    OpenBLAS thread and jemalloc with retained pages each roughly halve the ASR scorer's latency.
    Variables already set by the caller win.
    """
    env = dict(base)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if os.path.exists(JEMALLOC) and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = JEMALLOC
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def grpc_healthy(port: int, timeout: float = 1.0) -> bool:
    """True when the gRPC server on port answers health SERVING."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ready(port: int, path: str = "/readyz", timeout: float = 2.0) -> bool:
    """True when the HTTP server on port answers 200 on path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def healthy(name: str, port: int) -> bool:
    """The stack's health check of a service: HTTP readiness (HTTP_READY_PATHS) or gRPC health."""
    path = HTTP_READY_PATHS.get(name)
    return http_ready(port, path) if path else grpc_healthy(port)


def service_address(name: str, port: int) -> str:
    """Where clients reach a service on this machine: a URL for HTTP services, host:port for gRPC."""
    return f"http://127.0.0.1:{port}" if name in HTTP_READY_PATHS else f"127.0.0.1:{port}"


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis(paths: StackPaths, url: str) -> str:
    """Start a local redis-server when none answers at url; returns what was done."""
    if redis_answers(url):
        return "already running"
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(f"Redis does not answer at {url} and redis-server is not installed: run scripts/bootstrap.sh")
    from urllib.parse import urlparse

    port = urlparse(url).port or 6379
    data = paths.home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run([binary, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                    "--appendonly", "yes", "--pidfile", str(paths.pid_file("redis")),
                    "--logfile", str(paths.log_file("redis"))], check=True)
    for _ in range(50):
        if redis_answers(url):
            return f"started on port {port}"
        time.sleep(0.1)
    raise SystemExit(f"redis-server did not answer on port {port}; see {paths.log_file('redis')}")


def vllm_python(environ: Mapping[str, str] | None = None) -> str:
    """The Python that runs vLLM: this one when it has vLLM, else SPEECHRL_VLLM_PYTHON, else the .venv-vllm
    beside this environment (bootstrap.sh's). SystemExit naming what to do when there is none."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = env.get("SPEECHRL_VLLM_PYTHON") or str(Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python")
    if not os.access(candidate, os.X_OK):
        raise SystemExit(f"--rollout-backend vllm: no vLLM here and no {candidate}; run scripts/bootstrap.sh (it makes "
                         ".venv-vllm unless SPEECHRL_VLLM=0) or set SPEECHRL_VLLM_PYTHON")
    return candidate


def start_service(name: str, paths: StackPaths, rollout_backend: str = "") -> int:
    """Start one service in its own session, logging to a file; returns its pid. rollout_backend "vllm"
    runs the rollout service on vLLM, in vLLM's environment (vllm_python)."""
    existing = read_pid(paths.pid_file(name))
    if existing is not None:
        return existing
    port = service_port(name)
    if port_answers(port):  # not this stack's (it has no pid file): another checkout's stack, a stale server
        raise SystemExit(f"{name}: port {port} is already taken by {port_holder(port)}; stop it (`speechrl down` "
                         f"in its checkout) or give this stack another port (SPEECHRL_{name.upper()}_PORT)")
    log = paths.log_file(name).open("ab")
    python = vllm_python() if name == "rollout" and rollout_backend == "vllm" else sys.executable
    cmd = [python, "-m", "speechrl.services.cli", "serve", name, "--port", str(service_port(name))]
    env = service_env(dict(os.environ))
    if name == "rollout" and rollout_backend:
        env["SPEECHRL_ROLLOUT_BACKEND"] = rollout_backend
    if name in REDIS_CLIENTS:  # its own SPEECHRL_<NAME>_REDIS_URL, if set, wins
        env.setdefault(f"SPEECHRL_{name.upper()}_REDIS_URL", redis_url())
    # The gateway renders speech tokens through the stack's token2wav when one runs (it starts first);
    # a bare `speechrl serve gateway` has none, and `up --only gateway` must not wait for one.
    if name == "gateway" and read_pid(paths.pid_file("token2wav")) is not None:
        env.setdefault("SPEECHRL_GATEWAY_TOKEN2WAV", f"127.0.0.1:{service_port('token2wav')}")
    if name == "gateway":  # its dashboard (/ui) watches the whole stack; none of these gates its readiness
        env.setdefault("SPEECHRL_GATEWAY_ENCODER", f"127.0.0.1:{service_port('encoder')}")
        env.setdefault("SPEECHRL_GATEWAY_ROLLOUT", f"127.0.0.1:{service_port('rollout')}")
        env.setdefault("SPEECHRL_GATEWAY_TRAINER", f"http://127.0.0.1:{service_port('trainer')}")
        env.setdefault("SPEECHRL_GATEWAY_REDIS_URL", redis_url())
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    paths.pid_file(name).write_text(str(proc.pid))
    return proc.pid


def wait_healthy(names: Sequence[str], paths: StackPaths, timeout: float) -> None:
    """Wait until every service is healthy, showing progress; exit with the log tail on failure."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        for name in list(pending):
            if read_pid(paths.pid_file(name)) is None:
                tail = paths.log_file(name).read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} exited during start-up; last log lines:\n{tail}")
            if healthy(name, service_port(name)):
                pending.remove(name)
                print(f"  {name:<16} ready on port {service_port(name)}", flush=True)
        if pending and time.monotonic() > deadline:
            raise SystemExit(f"not healthy after {timeout:.0f} s: {', '.join(pending)}; logs in {paths.logs}")
        if pending:
            time.sleep(0.5)


def stop_pid(pid: int, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL after grace seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def up(names: Sequence[str], paths: StackPaths, timeout: float, rollout_backend: str = "") -> None:
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    print(f"redis: {ensure_redis(paths, redis_url())} ({redis_url()})", flush=True)
    for name in names:
        pid = start_service(name, paths, rollout_backend)
        print(f"  {name:<16} starting (pid {pid}, log {paths.log_file(name)})", flush=True)
    wait_healthy(names, paths, timeout)
    print(status_table(names, paths))


def down(names: Sequence[str], paths: StackPaths, grace: float) -> None:
    for name in reversed(names):
        pid = read_pid(paths.pid_file(name))
        if pid is not None:
            stop_pid(pid, grace)
            print(f"stopped {name} (pid {pid})")
        paths.pid_file(name).unlink(missing_ok=True)
    redis_pid = read_pid(paths.pid_file("redis"))
    if redis_pid is not None:  # only a Redis this stack started
        os.kill(redis_pid, signal.SIGTERM)
        print(f"stopped redis (pid {redis_pid})")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def running(names: Sequence[str], paths: StackPaths, timeout: float, grace: float = 10.0,
            rollout_backend: str = "") -> Iterator[None]:
    """The services up for the length of a with-block, and down after it: also when `up` fails
    halfway, on an exception, and on SIGTERM (`kill`, a CI timeout), which Python would otherwise
    end without running any cleanup, leaving the services running with their ports taken."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if on_main_thread else None
    try:
        up(names, paths, timeout, rollout_backend)
        yield
    finally:
        down(names, paths, grace)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def status_table(names: Sequence[str], paths: StackPaths) -> str:
    rows = [f"{'service':<16} {'address':<22} {'pid':<8} state"]
    for name in names:
        pid = read_pid(paths.pid_file(name))
        port = service_port(name)
        state = "healthy" if healthy(name, port) else ("starting/unhealthy" if pid else "stopped")
        rows.append(f"{name:<16} {service_address(name, port):<22} {pid or '-':<8} {state}")
    rows.append(f"{'redis':<16} {redis_url():<22} {'':<8} {'up' if redis_answers(redis_url()) else 'down'}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--only", default=",".join(STACK_SERVICES),
                        help=f"comma-separated services (default: {','.join(STACK_SERVICES)})")
    parser.add_argument("--home", default=os.environ.get("SPEECHRL_HOME", ".speechrl"),
                        help="state folder for pid files and logs (env SPEECHRL_HOME)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for health on up")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds each service may drain on down")
    parser.add_argument("--rollout-backend", choices=["transformers", "vllm"], default="",
                        help="up: the rollout service's runtime (default: its SPEECHRL_ROLLOUT_BACKEND, else "
                             "transformers); vllm runs it in vLLM's environment (.venv-vllm)")
    args = parser.parse_args(argv)
    names = [n for n in STACK_SERVICES if n in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(STACK_SERVICES)
    if unknown:
        parser.error(f"unknown services {sorted(unknown)}; choose from {', '.join(STACK_SERVICES)}")
    paths = StackPaths(Path(args.home).resolve())
    if args.command == "up":
        up(names, paths, args.timeout, args.rollout_backend)
    elif args.command == "down":
        down(names, paths, args.grace)
    else:
        print(status_table(names, paths))

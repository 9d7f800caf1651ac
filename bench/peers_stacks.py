"""The serving stacks of bench/peers.py: their environments, their servers and the check that every
engine process runs with the services' process settings.

Each peer stack gets an environment of its own under .cache/bench-peers/<stack> (gitignored; nothing
of it reaches the project's dependencies). It is layered on the project's .venv: a .pth file adds the
project venv's site-packages after the peer's own, so the peer's server imports SpeechRL's engines and
every library under them at the project's versions, and the peer's packages are installed against
those versions (pip constraints from `pip freeze` of .venv). Where a peer cannot run with a project
version it gets its own, named in `unpinned` and said in RESULTS.md. A stamp of the inputs makes a
second run skip the install; `rm -r .cache/bench-peers` starts from nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = ROOT / ".cache" / "bench-peers"


@dataclass(frozen=True)
class PeerEnv:
    """How to install one peer stack's environment."""

    name: str
    packages: tuple[str, ...]  # installed with their dependencies, against the project's versions
    no_deps: tuple[str, ...] = ()  # installed without their declared dependencies (see why in `note`)
    unpinned: tuple[str, ...] = ()  # project packages this stack gets at a version of its own
    note: str = ""

    @property
    def path(self) -> Path:
        return CACHE / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


PEER_ENVS = {
    "pytriton": PeerEnv(
        "pytriton", ("pyzmq", "sh", "typing_inspect", "wrapt", "numpy<2"), no_deps=("nvidia-pytriton==0.7.0",),
        unpinned=("numpy",),
        note="numpy 1.26 in the PyTriton environment: Triton's Python-backend stub (pybind11) misreads numpy 2 "
             "tensors (BYTES inputs fail to deserialize, outputs come back empty), and nvidia-pytriton 0.7.0 "
             "requires numpy<2. Its tritonclient[grpc] pin (grpcio<1.68) is not taken: the project's grpcio "
             "1.85 runs Triton's gRPC client, which the driver uses from the project venv."),
    "ray": PeerEnv("ray", ("ray[serve]==2.60.0",)),
    "litserve": PeerEnv("litserve", ("litserve==0.2.19",)),
}


def _pip(*args: str) -> None:
    """pip of this venv; its output only when it fails (the resolver's warnings about project packages that
    a peer's pins leave unsatisfied are expected: see PeerEnv.note)."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def ensure_env(env: PeerEnv) -> float:
    """Make env's environment unless its stamp says it is made; the seconds it took."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    pins = [line for line in freeze.splitlines() if line.split("==")[0].lower() not in env.unpinned]
    stamp = env.path / (".made-" + hashlib.sha256(repr((env, pins)).encode()).hexdigest()[:16])
    if stamp.exists():
        return 0.0
    start = time.perf_counter()
    print(f"installing the {env.name} environment in {env.path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(env.path)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = env.path / "lib" / version / "site-packages"
    # After the peer's own packages: the project's, with the .pth files of its editable installs.
    (own / "_speechrl_project.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    constraints = env.path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    target = ("--python", str(env.python), "install", "-c", str(constraints))
    _pip(*target, *env.packages)
    if env.no_deps:
        _pip(*target, "--no-deps", *env.no_deps)
    stamp.touch()
    return time.perf_counter() - start


@dataclass
class PeerServer:
    """A peer stack's server script in its environment, in a session of its own (its whole tree is stopped)."""

    stack: str
    args: list[str]
    ready_url: str  # answers 200 once the stack serves
    endpoint: str  # where its driver calls it
    report_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(BENCH), **self.env}
        with open(CACHE / "logs" / f"{self.stack}.log", "wb") as log:
            self.proc = subprocess.Popen([str(PEER_ENVS[self.stack].python), str(BENCH / f"peers_{self.stack}.py"),
                                          *self.args, "--report-dir", str(self.report_dir)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)

    def wait_ready(self, scorers: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while len(list(self.report_dir.glob(f"{self.stack}-*.json"))) < scorers or not _answers(self.ready_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.stack} did not start; see {CACHE / 'logs' / (self.stack + '.log')}")
            time.sleep(0.5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def engine_pids(self) -> dict[str, int]:
        return {json.loads(p.read_text())["scorer"]: json.loads(p.read_text())["pid"]
                for p in self.report_dir.glob(f"{self.stack}-*.json")}

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc.pid)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def stop_tree(pid: int, grace_s: float = 15) -> None:
    """SIGTERM to pid (it stops its own children: Ray's cluster, Triton's server), then to whatever of its
    tree is left after grace_s, and SIGKILL to what is left 5 s later."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for targets, wait_s in (([root], grace_s), (tree, 5.0)):
        for proc in targets:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        psutil.wait_procs(targets, timeout=wait_s)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def peer_servers(ports: Callable[[], int], report_dir: Path) -> list[PeerServer]:
    """The three peer stacks' servers (not started)."""
    http, grpc, metrics, ray, lit = (ports() for _ in range(5))
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    return [
        # The stub of Triton's Python backend links libpython3.11 and must get this interpreter's, not the
        # system's (a 3.11.2 libpython under the 3.11.7 standard library fails in multiprocessing).
        PeerServer("pytriton", ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                   f"http://127.0.0.1:{http}/v2/health/ready", f"127.0.0.1:{grpc}", report_dir,
                   env={"LD_LIBRARY_PATH": ":".join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))},
                   ),
        PeerServer("ray", ["--port", str(ray)], f"http://127.0.0.1:{ray}/-/healthz", f"http://127.0.0.1:{ray}", report_dir),
        PeerServer("litserve", ["--port", str(lit)], f"http://127.0.0.1:{lit}/health", f"http://127.0.0.1:{lit}",
                   report_dir),
    ]


def settings_of(pid: int, names: tuple[str, ...]) -> dict[str, str]:
    """The process settings a running process has: the named variables of its environment, and whether
    jemalloc is mapped into it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    environ = dict(entry.decode(errors="replace").split("=", 1) for entry in raw if b"=" in entry)
    settings = {name: environ.get(name, "(unset)") for name in names}
    settings["jemalloc mapped"] = str("libjemalloc" in Path(f"/proc/{pid}/maps").read_text())
    # The kernel shares the CPU between scheduling groups (one per session, with autogroup) before it looks
    # at processes: a server in a session of its own would get half the machine against the whole benchmark.
    settings["scheduling group"] = _autogroup(pid)
    return settings


def _autogroup(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except OSError:  # a kernel without autogroup: one group
        return "-"


def own_autogroup() -> str:
    """The scheduling group of this process (every stack's processes must be in it)."""
    return _autogroup("self")


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by pid and every process under it."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in tree:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class Freezer:
    """Keeps every stack but the one being measured stopped (SIGSTOP), so that no stack's background work
    (LitServe's workers poll their queues, Ray's daemons tick: tens of percent of a core while idle) runs
    during another stack's measurement. trees: each stack's processes (roots; their children come along)."""

    def __init__(self, trees: dict[str, list[int]]):
        self.trees = trees

    def _signal(self, roots: set[int], sig: signal.Signals) -> None:
        for pid in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.send_signal(sig)

    def only(self, stack: str | None) -> None:
        """Let stack run (None: no stack) and stop every other."""
        active = set(self.trees.get(stack, [])) if stack else set()
        self._signal({p for pids in self.trees.values() for p in pids} - active, signal.SIGSTOP)
        self._signal(active, signal.SIGCONT)

    def resume_all(self) -> None:
        self._signal({p for pids in self.trees.values() for p in pids}, signal.SIGCONT)

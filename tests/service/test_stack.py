"""`speechrl up/down/status`: starts Redis when none answers, starts services, waits for health, stops them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from speechrl.services.ports import free_port
from speechrl.services.stack import grpc_healthy


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speechrl.services.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_up_starts_redis_and_services_then_down_stops_them(tmp_path: Path) -> None:
    redis_port, rules_port = free_port(), free_port()
    env = {**os.environ, "SPEECHRL_HOME": str(tmp_path / "home"),
           "SPEECHRL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SPEECHRL_RULES_PORT": str(rules_port)}
    up = run_cli("up", "--only", "rules", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"started on port {redis_port}" in up.stdout
        assert redis.Redis(port=redis_port).ping()
        assert grpc_healthy(rules_port)
        status = run_cli("status", "--only", "rules", env=env)
        assert "healthy" in status.stdout and str(rules_port) in status.stdout
        again = run_cli("up", "--only", "rules", env=env)  # idempotent: reuses what runs
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = run_cli("down", "--only", "rules", env=env)
    assert down.returncode == 0, down.stderr
    assert "stopped rules" in down.stdout and "stopped redis" in down.stdout
    assert not grpc_healthy(rules_port)
    log = (tmp_path / "home" / "logs" / "rules.log").read_text()
    assert "serving speechrl.v1.RuleRewards" in log


def test_up_refuses_a_port_another_process_answers_on(tmp_path: Path) -> None:
    """A second checkout's stack (its own SPEECHRL_HOME) on the same ports is refused, the holder named,
    rather than started beside the first."""
    redis_port, rules_port = free_port(), free_port()
    first = {**os.environ, "SPEECHRL_HOME": str(tmp_path / "first"),
             "SPEECHRL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SPEECHRL_RULES_PORT": str(rules_port)}
    assert run_cli("up", "--only", "rules", env=first).returncode == 0
    try:
        second = run_cli("up", "--only", "rules", env={**first, "SPEECHRL_HOME": str(tmp_path / "second")})
        assert second.returncode != 0
        assert f"rules: port {rules_port} is already taken by pid" in second.stderr, second.stdout + second.stderr
    finally:
        run_cli("down", "--only", "rules", env=first)


def test_unknown_service_is_refused(tmp_path: Path) -> None:
    result = run_cli("up", "--only", "nonsense", env={**os.environ, "SPEECHRL_HOME": str(tmp_path)})
    assert result.returncode != 0 and "unknown services" in result.stderr


def test_a_stack_held_by_running_stops_when_its_owner_gets_sigterm(tmp_path: Path) -> None:
    """A reproduction killed with SIGTERM (kill, a CI timeout) takes its services down with it."""
    rules_port = free_port()
    env = {**os.environ, "SPEECHRL_HOME": str(tmp_path / "home"), "SPEECHRL_RULES_PORT": str(rules_port)}
    owner = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom pathlib import Path\nfrom speechrl.services import stack\n"
         f"with stack.running(['rules'], stack.StackPaths(Path({str(tmp_path / 'home')!r})), timeout=60):\n"
         "    print('up', flush=True)\n    time.sleep(120)\n"],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        assert "up" in iter(lambda: owner.stdout.readline().strip(), "")  # after up()'s own lines
        assert grpc_healthy(rules_port)
        owner.terminate()
        assert owner.wait(60) == 128 + 15
    finally:
        owner.kill()
    assert not grpc_healthy(rules_port)
    assert not (tmp_path / "home" / "run" / "rules.pid").exists()

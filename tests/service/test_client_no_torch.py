"""The light client installs alone, without torch, and works: what a verl or TRL user gets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from tests.support.servers import serve_in_thread

CLIENTS = Path(__file__).resolve().parents[2] / "clients"

# Run inside the fresh venv: import everything the client ships, prove torch is absent, then score
# against the rule-reward server that this test runs.
PROBE = """
import importlib.util, json, sys
import speechrl.client, speechrl.rewards, speechrl.v1
from speechrl.client import RuleRewardsClient
with RuleRewardsClient(sys.argv[1], timeout_s=20) as client:
    client.wait_until_ready(timeout_s=20)
    results = client.score(["the cat sat"], ["the cat sat on the mat"])
print(json.dumps({"torch_spec": importlib.util.find_spec("torch") is not None,
                  "torch_loaded": "torch" in sys.modules, "wer": results[0].unwrap().wer}))
"""


@pytest.mark.slow
def test_client_installs_and_runs_without_torch(tmp_path: Path) -> None:
    python = shutil.which("python3.11") or sys.executable
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", str(CLIENTS)], check=True, capture_output=True, text=True)

    listed = subprocess.run([*pip, "list", "--format=json"], check=True, capture_output=True, text=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "speechrl-client" in names and "grpcio" in names
    assert not names & {"torch", "torchaudio", "soundfile", "speechrl-services"}

    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as running:
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE, f"127.0.0.1:{running.port}"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    out = json.loads(probe.stdout.strip().splitlines()[-1])
    assert out == {"torch_spec": False, "torch_loaded": False, "wer": 0.5}

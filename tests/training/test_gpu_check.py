"""bench/gpu.py, the GPU check, runs its whole plan at tiny sizes on the CPU (so a lent GPU's minutes go
to measuring, not to fixing it), also as bench/gpu_device.sh runs it on a lent machine's bare image, and
its check fails when an offload leaves memory behind."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# The lent machines' image has no CTranslate2, and its 43 MB wheel does not fit beside the carried ones
# (bench/gpu_device.sh): the plan, the Qwen3-ASR policy included, must run without it.
WITHOUT_CTRANSLATE2 = ("import runpy, sys; sys.modules['ctranslate2'] = None; sys.argv = ['bench/gpu.py', '--check']; "
                       "runpy.run_path('bench/gpu.py', run_name='__main__')")


def test_the_plan_runs_end_to_end_on_the_cpu_without_ctranslate2() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_CTRANSLATE2], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for phase in ("| encode |", "| rollout |", "| score |", "| update |", "| ASR scorer batch |"):
        assert phase in done.stdout
    assert "Check (sequenced peak within 15% of the largest phase and below all resident): passed" in done.stdout


def test_the_check_fails_when_an_offload_leaves_memory_behind() -> None:
    bench = gpu_bench()
    moves = {name: (0.0, 0.0) for name in bench.PHASES}
    clean = {"all_resident": {name: (0, 10) for name in bench.PHASES},
             "sequenced": {"encode": (0, 2), "rollout": (0, 3), "score": (0, 1), "update": (0, 6)},
             "moves": moves, "throughput": {1: 1.0}, "vllm": "-"}
    assert bench.report(clean, "cpu")[1]
    leaky = {**clean, "sequenced": {"encode": (0, 2), "rollout": (2, 5), "score": (5, 6), "update": (6, 12)}}
    table, passed = bench.report(leaky, "cpu")
    assert not passed and "FAILED" in table
    assert bench.GPU_SIZES.policy_layers == 24 and bench.GPU_SIZES.vocab == 151_936  # Qwen2-0.5B's shape


@pytest.mark.slow
def test_the_device_run_needs_only_the_lent_machines_packages_and_the_carried_wheels() -> None:
    """bench/gpu_device.sh rehearse: `run --check` in a venv holding only the lent machines' packages plus
    the wheels `wheels` downloads, so an import the image lacks and the wheels do not carry fails here,
    not in a GPU session's few minutes. It needs the package registry (a venv of torch and friends)."""
    done = subprocess.run(["bash", "bench/gpu_device.sh", "rehearse"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Check (sequenced peak within 15% of the largest phase and below all resident): passed" in done.stdout

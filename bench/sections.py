"""Writing a benchmark's result section: the machine it ran on, the latency percentiles it reports."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine a result was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def write_section(name: str, title: str, body: str) -> Path:
    """Write one benchmark's markdown section (title, date, machine, body) to bench/results/<name>.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"## {title}\n\nMeasured {stamp} on {machine()}.\n\n{body.strip()}\n"
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    print(text)
    return path

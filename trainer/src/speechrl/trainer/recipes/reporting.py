"""What a reproduction writes and prints: its results files, the wall time of each stage, and its
metrics over seeds (mean and spread)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    """A reproduction's results: results.json, results.md (the table), and the table printed."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    print(markdown)


@contextlib.contextmanager
def stage_timer(stages: dict[str, Any], name: str) -> Iterator[None]:
    """Wall seconds of a stage, into stages[name] (a reproduction's time per stage)."""
    started = time.monotonic()
    yield
    stages[name] = round(time.monotonic() - started, 1)


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]: the seeds a reproduction repeats its RL runs over (at least one, no repeats)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must name at least one seed, each once; got {text!r}")
    return seeds


def over_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and spread of every metric the runs share, over runs that differ only in their seed. The
    spread is the sample standard deviation (ddof 1; 0 for a single run): the noise band a
    difference between systems has to clear."""
    keys = [key for key in runs[0] if all(key in run for run in runs)] if runs else []
    summary = {}
    for key in keys:
        values = np.array([run[key] for run in runs], dtype=np.float64)
        summary[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return summary


def mean_spread(value: tuple[float, float], digits: int = 3) -> str:
    """(mean, spread) as "0.512 ± 0.031"."""
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

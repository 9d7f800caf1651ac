"""What a reproduction writes and prints: its results files and the wall time of each stage."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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

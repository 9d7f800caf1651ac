"""The trainer's own copy of its jobs, one JSON file per job, from which a Redis that lost its data
(a restart without persistence) is filled again.

    journal = JobJournal(Path("runs/jobs/127.0.0.1-6379-0"))
    journal.save_record(job.id, job.to_json())     # before each write to Redis
    journal.append_metrics(job.id, row)            # one line per step
    for record, metrics in journal.all():          # what to re-publish
        ...

Redis stays what the job API reads and what the worker's queue lives in; the journal is only
written by the trainer process that owns the jobs and read back when Redis forgot them. A job's
record (`<id>.json`) is replaced atomically (write + rename), so a trainer killed mid-write leaves
the previous one; its metrics (`<id>.metrics.jsonl`) are appended a line per step, so a step costs
the same at step 10,000 as at step 1, and a line cut short by a kill is skipped when read.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def journal_folder(root: str, redis_url: str, prefix: str) -> Path | None:
    """The journal of the jobs under prefix in the Redis at redis_url: one sub-folder per Redis, so
    a trainer pointed at another Redis (a test's private one) never re-publishes foreign jobs.
    None when root is empty (no journal)."""
    if not root:
        return None
    url = urlsplit(redis_url)  # the password never reaches a path
    name = f"{url.hostname or 'localhost'}-{url.port or 6379}-{url.path.strip('/') or '0'}-{prefix}"
    return Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


class JobJournal:
    """Each job's record as `<folder>/<id>.json` and its per-step metrics as `<folder>/<id>.metrics.jsonl`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # the API's event loop and the worker thread both write

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def _metrics_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.metrics.jsonl"

    def save_record(self, job_id: str, record: dict[str, Any]) -> None:
        path = self._path(job_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def load_record(self, job_id: str) -> dict[str, Any] | None:
        """The job's record as Job.to_json() gave it, or None when it is not journalled."""
        path = self._path(job_id)
        return json.loads(path.read_text()) if path.exists() else None

    def append_metrics(self, job_id: str, row: dict[str, Any]) -> None:
        with self._metrics_path(job_id).open("a") as out:
            out.write(json.dumps(row) + "\n")

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        path = self._metrics_path(job_id)
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a trainer killed mid-append
                continue
        return rows

    def trim_metrics(self, job_id: str, last_step: int) -> None:
        """Keep the metric rows up to last_step (a resumed job repeats the later steps)."""
        kept = [r for r in self.metrics(job_id) if r["step"] <= last_step]
        path = self._metrics_path(job_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)

    def load(self, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(the job's record, its metric rows), or None."""
        record = self.load_record(job_id)
        return None if record is None else (record, self.metrics(job_id))

    def remove(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)
        self._metrics_path(job_id).unlink(missing_ok=True)

    def all(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Every journalled job, oldest first."""
        entries = [self.load(p.stem) for p in self.folder.glob("*.json")]
        return sorted((e for e in entries if e is not None), key=lambda e: float(e[0]["created"]))

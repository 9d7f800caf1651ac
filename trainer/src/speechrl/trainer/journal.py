"""The trainer's own copy of its jobs, one JSON file per job, from which a Redis that lost its data
(a restart without persistence) is filled again.

    journal = JobJournal(Path("runs/jobs/127.0.0.1-6379-0"))
    journal.save(job.id, job.to_json(), metrics)   # before each write to Redis
    for record, metrics in journal.all():          # what to re-publish
        ...

Redis stays what the job API reads and what the worker's queue lives in; the journal is only
written by the trainer process that owns the jobs and read back when Redis forgot them. Files are
replaced atomically (write + rename), so a trainer killed mid-write leaves the previous record.
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
    """Each job's record and per-step metrics as `<folder>/<id>.json`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # the API's event loop and the worker thread both write

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def save(self, job_id: str, record: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
        path = self._path(job_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job": record, "metrics": metrics}))
        os.replace(tmp, path)

    def load(self, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(the job's record as Job.to_json() gave it, its metric records), or None."""
        path = self._path(job_id)
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return raw["job"], raw["metrics"]

    def remove(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def all(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Every journalled job, oldest first."""
        entries = [self.load(p.stem) for p in self.folder.glob("*.json")]
        return sorted((e for e in entries if e is not None), key=lambda e: float(e[0]["created"]))

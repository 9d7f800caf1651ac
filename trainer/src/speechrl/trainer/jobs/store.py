"""Training jobs kept in Redis, so a restarted trainer service finds them and resumes them.

Keys (prefix `speechrl:jobs`):
  <prefix>:<id>          hash: id, kind, config (JSON), status, step, total_steps, created, updated,
                         error, out_dir, cancel (1 when asked to stop)
  <prefix>:<id>:metrics  list of per-step metric records (JSON), in step order
  <prefix>:index         sorted set of ids by creation time
  <prefix>:queue         list of ids waiting for a worker (FIFO)

  <prefix>:journal:<h>   set once this trainer's journal (journal.py) has been published to this
                         Redis; its absence means Redis lost its data (or never had it)

A job's files (checkpoints, metrics.jsonl, plots) live in its out_dir; Redis holds what the job
API shows. Redis should persist (appendonly, as docker-compose and the k8s StatefulSet set it).
A Redis that lost its data anyway (a restart without persistence) loses no job: every change is
written to the trainer's journal first, and the store re-publishes the journal whenever its
marker key is missing, checked before each read and inside each write's transaction (so a write
that lands on an emptied Redis is followed at once by the full records). A write that fails
because Redis is down is kept in the journal and re-published when Redis answers again; the
worker's writes therefore never fail a running job. The journal belongs to one trainer process:
a cancel sent to another trainer's API is not journalled by this one.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from speechrl.trainer.jobs.journal import JobJournal

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Job:
    """What the job API shows of one training job."""

    id: str
    kind: str
    config: dict[str, Any]
    status: str = "queued"
    step: int = 0
    total_steps: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    error: str = ""
    out_dir: str = ""
    cancel: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobNotFound(KeyError):
    """No job has that id."""


class JobStore:
    """CRUD of jobs and their metrics in Redis, journalled to files when journal is given."""

    def __init__(self, client: redis.Redis, prefix: str = "speechrl:jobs", journal: JobJournal | None = None):
        self.client = client
        self.prefix = prefix
        self.journal = journal
        folder = str(journal.folder.resolve()) if journal else ""
        self._marker = f"{prefix}:journal:{hashlib.sha1(folder.encode()).hexdigest()[:12]}"
        self._dirty: set[str] = set()  # jobs whose last Redis write failed: their journal entry is newer

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:{job_id}"

    def submit(self, kind: str, config: dict[str, Any], out_dir: str, total_steps: int) -> Job:
        """Store a new queued job and put it on the queue."""
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), kind=kind, config=config,
                  out_dir=out_dir, total_steps=total_steps)
        self.sync()
        if self.journal:
            self.journal.save_record(job.id, job.to_json())
        pipe = self.client.pipeline()
        pipe.hset(self._key(job.id), mapping=self._encode(job))  # type: ignore[arg-type]
        pipe.zadd(f"{self.prefix}:index", {job.id: job.created})
        pipe.rpush(f"{self.prefix}:queue", job.id)
        try:
            self._execute(pipe)
        except redis.RedisError:
            if self.journal:  # the caller hears 503 and resubmits: no job may appear later
                self.journal.remove(job.id)
            raise
        return job

    def _execute(self, pipe: redis.client.Pipeline) -> None:
        """Run a write's transaction; when it shows that Redis lost its data, re-publish the journal
        (which already holds this write) so the job is whole again, not a fragment."""
        if self.journal:
            pipe.exists(self._marker)
        results = pipe.execute()
        if self.journal and not results[-1]:
            self.republish()

    def sync(self) -> None:
        """Re-publish journalled jobs that Redis is missing or behind on (no-op without a journal)."""
        if self.journal and (self._dirty or not self.client.exists(self._marker)):
            self.republish()

    def republish(self) -> None:
        """Write every journalled job (or, when Redis kept its data, only the dirty ones) to Redis."""
        assert self.journal is not None
        with self.journal.lock:
            whole = not self.client.exists(self._marker)
            dirty = set(self._dirty)  # a write failing from now on marks its job again, for the next round
            entries = self.journal.all() if whole else [e for i in dirty if (e := self.journal.load(i)) is not None]
            pipe = self.client.pipeline()
            for record, metrics in entries:
                job, key = Job(**record), self._key(record["id"])
                pipe.delete(key, f"{key}:metrics")
                pipe.hset(key, mapping=self._encode(job))  # type: ignore[arg-type]
                if metrics:
                    pipe.rpush(f"{key}:metrics", *[json.dumps(m) for m in metrics])
                pipe.zadd(f"{self.prefix}:index", {job.id: job.created})
                if job.status == "queued":  # the worker skips a popped job that is no longer queued
                    pipe.lrem(f"{self.prefix}:queue", 0, job.id)
                    pipe.rpush(f"{self.prefix}:queue", job.id)
            pipe.set(self._marker, "1")
            pipe.execute()
            self._dirty -= dirty
        if whole:
            log.warning("job store: Redis had lost its data; re-published %d job(s) from the journal", len(entries))

    def _journalled(self, job_id: str, change: Callable[[dict[str, Any]], None] | None = None, *,
                    append: dict[str, Any] | None = None, trim_after: int | None = None) -> bool:
        """Apply change (if any) to the journalled record of job_id, then append a metric row or trim
        the rows past a step; False when the job is not journalled."""
        if not self.journal:
            return False
        with self.journal.lock:
            record = self.journal.load_record(job_id)
            if record is None:
                return False
            if change is not None:
                change(record)
                self.journal.save_record(job_id, record)
            if append is not None:
                self.journal.append_metrics(job_id, append)
            if trim_after is not None:
                self.journal.trim_metrics(job_id, trim_after)
        return True

    def _write(self, job_id: str, pipe: redis.client.Pipeline, durable: bool) -> None:
        """Execute a write; when Redis is down and the journal has it, keep it for re-publishing."""
        try:
            self._execute(pipe)
        except redis.RedisError as exc:
            if not durable:
                raise
            self._dirty.add(job_id)
            log.warning("job %s: Redis unreachable (%s); kept in the journal, re-published later", job_id, exc)

    @staticmethod
    def _encode(job: Job) -> dict[str, str]:
        values = job.to_json()
        values["config"] = json.dumps(job.config)
        values["cancel"] = "1" if job.cancel else "0"
        return {k: str(v) for k, v in values.items()}

    def get(self, job_id: str) -> Job:
        self.sync()
        raw: Any = self.client.hgetall(self._key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        v = {_text(k): _text(x) for k, x in raw.items()}
        return Job(id=v["id"], kind=v["kind"], config=json.loads(v["config"]), status=v["status"],
                   step=int(v["step"]), total_steps=int(v["total_steps"]), created=float(v["created"]),
                   updated=float(v["updated"]), error=v.get("error", ""), out_dir=v.get("out_dir", ""),
                   cancel=v.get("cancel") == "1")

    def list(self) -> builtins.list[Job]:
        """Every job, newest first."""
        self.sync()
        ids = [_text(i) for i in self.client.zrevrange(f"{self.prefix}:index", 0, -1)]  # type: ignore[union-attr]
        return [self.get(i) for i in ids if self.client.exists(self._key(i))]

    def update(self, job_id: str, **fields: Any) -> None:
        now = time.time()
        durable = self._journalled(job_id, lambda record: record.update(fields, updated=now))
        values = {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in fields.items()}
        values["updated"] = str(now)
        pipe = self.client.pipeline()
        pipe.hset(self._key(job_id), mapping=values)  # type: ignore[arg-type]
        self._write(job_id, pipe, durable)

    def record_step(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        """Append one step's metrics and advance the job's step counter."""
        row, now = {"step": step, **metrics}, time.time()
        durable = self._journalled(job_id, lambda record: record.update(step=step, updated=now), append=row)
        pipe = self.client.pipeline()
        pipe.rpush(f"{self._key(job_id)}:metrics", json.dumps(row))
        pipe.hset(self._key(job_id), mapping={"step": str(step), "updated": str(now)})
        self._write(job_id, pipe, durable)

    def metrics(self, job_id: str, since_step: int = 0) -> builtins.list[dict[str, Any]]:
        self.sync()
        raw: Any = self.client.lrange(f"{self._key(job_id)}:metrics", 0, -1)
        rows = [json.loads(r) for r in raw]
        return [r for r in rows if r["step"] > since_step]

    def rewind(self, job_id: str, step: int) -> None:
        """Set the job back to step, the checkpoint it resumes from: its metric records past step are
        dropped (the resumed job runs those steps again) and its step counter is step."""
        now = time.time()
        durable = self._journalled(job_id, lambda record: record.update(step=step, updated=now), trim_after=step)
        kept = [json.dumps(r) for r in self.metrics(job_id) if r["step"] <= step]
        pipe = self.client.pipeline()
        pipe.delete(f"{self._key(job_id)}:metrics")
        if kept:
            pipe.rpush(f"{self._key(job_id)}:metrics", *kept)
        pipe.hset(self._key(job_id), mapping={"step": str(step), "updated": str(now)})
        self._write(job_id, pipe, durable)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for; while Redis is unreachable, what the journal last saw."""
        try:
            return self.get(job_id).cancel
        except redis.RedisError:
            record = self.journal.load_record(job_id) if self.journal else None
            return bool(record and record.get("cancel"))

    def request_cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status in FINAL:
            return job
        if job.status == "queued":
            self.client.lrem(f"{self.prefix}:queue", 0, job_id)
            self.update(job_id, status="cancelled", cancel=True)
        else:
            self.update(job_id, cancel=True)
        return self.get(job_id)

    def next_queued(self, timeout_s: float) -> str | None:
        """Pop the next queued job id, waiting up to timeout_s (the worker's loop: it also re-publishes)."""
        self.sync()
        item = self.client.blpop([f"{self.prefix}:queue"], timeout=timeout_s)
        return _text(item[1]) if item else None  # type: ignore[index]

    def requeue_interrupted(self) -> builtins.list[str]:
        """Jobs left "running" by a trainer that died: queue them again (they resume from checkpoints)."""
        interrupted = [job.id for job in self.list() if job.status == "running"]
        for job_id in interrupted:
            self.update(job_id, status="queued")
            self.client.rpush(f"{self.prefix}:queue", job_id)
        return interrupted

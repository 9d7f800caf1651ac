"""Training jobs kept in Redis, so a restarted trainer service finds them and resumes them.

Keys (prefix `speechrl:jobs`):
  <prefix>:<id>          hash: id, kind, config (JSON), status, step, total_steps, created, updated,
                         error, out_dir, cancel (1 when asked to stop)
  <prefix>:<id>:metrics  list of per-step metric records (JSON), in step order
  <prefix>:index         sorted set of ids by creation time
  <prefix>:queue         list of ids waiting for a worker (FIFO)

A job's files (checkpoints, metrics.jsonl, plots) live in its out_dir; Redis holds what the job
API shows. Redis should persist (appendonly, as docker-compose and the k8s StatefulSet set it);
a Redis that lost its data loses the job list, not the checkpoints.
"""

from __future__ import annotations

import builtins
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

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
    """CRUD of jobs and their metrics in Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "speechrl:jobs"):
        self.client = client
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:{job_id}"

    def submit(self, kind: str, config: dict[str, Any], out_dir: str, total_steps: int) -> Job:
        """Store a new queued job and put it on the queue."""
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), kind=kind, config=config,
                  out_dir=out_dir, total_steps=total_steps)
        pipe = self.client.pipeline()
        pipe.hset(self._key(job.id), mapping=self._encode(job))  # type: ignore[arg-type]
        pipe.zadd(f"{self.prefix}:index", {job.id: job.created})
        pipe.rpush(f"{self.prefix}:queue", job.id)
        pipe.execute()
        return job

    @staticmethod
    def _encode(job: Job) -> dict[str, str]:
        values = job.to_json()
        values["config"] = json.dumps(job.config)
        values["cancel"] = "1" if job.cancel else "0"
        return {k: str(v) for k, v in values.items()}

    def get(self, job_id: str) -> Job:
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
        ids = [_text(i) for i in self.client.zrevrange(f"{self.prefix}:index", 0, -1)]  # type: ignore[union-attr]
        return [self.get(i) for i in ids if self.client.exists(self._key(i))]

    def update(self, job_id: str, **fields: Any) -> None:
        values = {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in fields.items()}
        values["updated"] = str(time.time())
        self.client.hset(self._key(job_id), mapping=values)  # type: ignore[arg-type]

    def record_step(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        """Append one step's metrics and advance the job's step counter."""
        pipe = self.client.pipeline()
        pipe.rpush(f"{self._key(job_id)}:metrics", json.dumps({"step": step, **metrics}))
        pipe.hset(self._key(job_id), mapping={"step": str(step), "updated": str(time.time())})
        pipe.execute()

    def metrics(self, job_id: str, since_step: int = 0) -> builtins.list[dict[str, Any]]:
        raw: Any = self.client.lrange(f"{self._key(job_id)}:metrics", 0, -1)
        rows = [json.loads(r) for r in raw]
        return [r for r in rows if r["step"] > since_step]

    def trim_metrics(self, job_id: str, last_step: int) -> None:
        """Drop metric records past last_step (a resumed job repeats those steps)."""
        kept = [json.dumps(r) for r in self.metrics(job_id) if r["step"] <= last_step]
        pipe = self.client.pipeline()
        pipe.delete(f"{self._key(job_id)}:metrics")
        if kept:
            pipe.rpush(f"{self._key(job_id)}:metrics", *kept)
        pipe.execute()

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
        """Pop the next queued job id, waiting up to timeout_s."""
        item = self.client.blpop([f"{self.prefix}:queue"], timeout=timeout_s)
        return _text(item[1]) if item else None  # type: ignore[index]

    def requeue_interrupted(self) -> builtins.list[str]:
        """Jobs left "running" by a trainer that died: queue them again (they resume from checkpoints)."""
        interrupted = [job.id for job in self.list() if job.status == "running"]
        for job_id in interrupted:
            self.update(job_id, status="queued")
            self.client.rpush(f"{self.prefix}:queue", job_id)
        return interrupted

"""The jobs panel: the trainer's job API (trainer/jobs/service.py), called from the gateway.

Only reads and cancel go through; submitting stays on the trainer's own API. Replies are trimmed to
what the page draws: a job without its config, metric rows with only the plotted keys.
"""

from __future__ import annotations

from typing import Any

import httpx

JOB_FIELDS = ("id", "kind", "status", "step", "total_steps", "created", "updated", "error", "out_dir", "cancel")
# Metric keys the page plots: the reward and its components, the ASR counts, the update's health,
# the time of each phase of a step.
PLOTTED = ("reward_mean", "wer", "insertions", "kl", "clip_fraction", "policy_version")
PLOTTED_PREFIXES = ("reward/", "time/")


class TrainerError(Exception):
    """The trainer answered an error, or could not be reached: its HTTP status and why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the dashboard lists it.

    >>> job_summary({"id": "j", "kind": "asr-grpo", "status": "running", "step": 2, "config": {"steps": 9}})["status"]
    'running'
    """
    return {key: job[key] for key in JOB_FIELDS if key in job}


def plotted(row: dict[str, Any]) -> dict[str, float]:
    """The plotted numbers of one metric row (its step included).

    >>> plotted({"step": 3, "reward_mean": 0.5, "reward/accuracy": 0.7, "time/rollout": 1.5, "lr": 1e-3, "note": "x"})
    {'step': 3, 'reward_mean': 0.5, 'reward/accuracy': 0.7, 'time/rollout': 1.5}
    """
    return {key: value for key, value in row.items() if isinstance(value, int | float) and not isinstance(value, bool)
            and (key == "step" or key in PLOTTED or key.startswith(PLOTTED_PREFIXES))}


class TrainerProxy:
    """Calls to the trainer's job API; every failure is a TrainerError carrying the status to answer."""

    def __init__(self, http: httpx.AsyncClient):
        self.http = http

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TrainerError(503, f"trainer unreachable at {self.http.base_url}: {type(exc).__name__}: {exc}") from None
        if reply.status_code >= 400:
            try:
                detail = str(reply.json().get("detail", reply.text))
            except ValueError:
                detail = reply.text
            # The trainer refusing the gateway's own token is the gateway's misconfiguration, not the caller's.
            raise TrainerError(502 if reply.status_code == 401 else reply.status_code, f"trainer: {detail}")
        return reply.json()

    async def jobs(self) -> list[dict[str, Any]]:
        return [job_summary(job) for job in await self._call("GET", "/v1/jobs")]

    async def job(self, job_id: str) -> dict[str, Any]:
        job = await self._call("GET", f"/v1/jobs/{job_id}")
        return {**job_summary(job), "device_memory": job.get("device_memory", [])}

    async def metrics(self, job_id: str, since_step: int) -> list[dict[str, float]]:
        rows = await self._call("GET", f"/v1/jobs/{job_id}/metrics", params={"since_step": since_step})
        return [plotted(row) for row in rows]

    async def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        try:
            return list(await self._call("GET", f"/v1/jobs/{job_id}/checkpoints"))
        except TrainerError as exc:
            if exc.status == 404 and "no job" not in exc.detail:  # a trainer from before that route
                return []
            raise

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return job_summary(await self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    async def close(self) -> None:
        await self.http.aclose()

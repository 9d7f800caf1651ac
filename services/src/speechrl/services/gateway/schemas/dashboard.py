"""Replies of the dashboard's JSON routes (/v1/dashboard/*): small, one per panel of /ui."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AuthInfo(BaseModel):
    """Whether the page must ask for a bearer token before calling the other dashboard routes."""

    token_required: bool = Field(examples=[True])


class ServiceOut(BaseModel):
    """One service: health of each endpoint, what GetServiceStatus says, and rates over the last seconds."""

    name: str = Field(examples=["rules"])
    health: dict[str, str] = Field(description="grpc.health.v1 state per endpoint, or the gRPC status of the check.",
                                   examples=[{"127.0.0.1:50053": "SERVING"}])
    error: str = Field(description="Why GetServiceStatus failed; empty when it answered.", examples=[""])
    backend: str = ""
    model: str = ""
    device: str = ""
    residency: str = Field(default="", description="resident, offloaded or asleep.", examples=["resident"])
    lease_device: str = Field(default="", description="The device whose lease it takes; empty: none.")
    lease_held: bool = False
    fencing_token: int = 0
    max_batch_size: int = 0
    max_wait_ms: int = 0
    items_processed: int = 0
    items_failed: int = 0
    policy_version: int = 0
    version: str = ""
    throughput_items_s: float | None = Field(default=None, description="Items a second over the window; null "
                                                                         "until two polls.", examples=[12.5])
    latency_p50_ms: float | None = Field(default=None, description="Median gRPC call latency over the window "
                                                                    "(Prometheus; null without service_metrics).")
    latency_p95_ms: float | None = None
    mean_batch_size: float | None = Field(default=None, description="Items per model batch over the window (Prometheus).")
    queue_depth: float | None = Field(default=None, description="Items waiting for a batch now (Prometheus).")


class ServicesOut(BaseModel):
    """Every service the gateway is configured to know."""

    services: list[ServiceOut]
    window_s: float = Field(description="The window of the rates, seconds.", examples=[15.0])


class SegmentOut(BaseModel):
    """One holder's turn on a device (Redis clock, ms since the epoch)."""

    owner: str = Field(examples=["encoder-4121"])
    role: str = Field(description="The owner without its pid: what colours it.", examples=["encoder"])
    fence: int
    start_ms: int
    end_ms: int
    end: str = Field(description="release, expire, open (the current holder) or lapsed (not renewed, its expiry "
                                 "not yet observed).", examples=["release"])


class ExpiryOut(BaseModel):
    """A grant whose holder stopped renewing, found lapsed by the next acquirer at at_ms."""

    owner: str
    fence: int
    at_ms: int
    held_ms: int


class Percentiles(BaseModel):
    """Nearest-rank percentiles of durations in the window, ms; null without any."""

    count: int
    p50: int | None
    p90: int | None
    p99: int | None
    max: int | None


class LedgerOut(BaseModel):
    """What one process holds on the device (services/ledger.py)."""

    owner: str
    device: str
    residency: str
    weight_bytes: int
    updated: float
    pid: int = 0
    allocated_bytes: int = -1
    reserved_bytes: int = -1
    stale: bool = False


class DeviceOut(BaseModel):
    """One device: its holders over the window, queue, counters and memory ledger."""

    device: str = Field(examples=["cuda:0"])
    holder: str | None
    fence: int
    queue: list[str] = Field(description="Owners waiting, in the order they will be served.")
    stats: dict[str, int] = Field(description="The lease's counters since Redis started: grants, releases, handoffs, "
                                              "expiries, skipped, reclaims.")
    segments: list[SegmentOut]
    expiries: list[ExpiryOut]
    wait_ms: Percentiles = Field(description="How long grants in the window waited in the queue.")
    hold_ms: Percentiles = Field(description="How long grants that ended in the window were held.")
    window_counts: dict[str, int] = Field(description="Events in the window by kind.")
    ledger: list[LedgerOut]


class LeaseOut(BaseModel):
    """The lease of every device seen in Redis, over the window."""

    now_ms: int
    since_ms: int
    devices: list[DeviceOut]
    error: str = Field(default="", description="Why Redis could not be read; empty when it could.")


class JobOut(BaseModel):
    """A training job as the trainer's job API lists it (without its config)."""

    id: str = Field(examples=["20250611-101500-a1b2c3"])
    kind: str = Field(examples=["asr-grpo"])
    status: str = Field(description="queued, running, succeeded, failed or cancelled.", examples=["running"])
    step: int
    total_steps: int
    created: float
    updated: float
    error: str = ""
    out_dir: str = ""
    cancel: bool = Field(default=False, description="A cancel was asked for; it stops after its current step.")


class JobsOut(BaseModel):
    jobs: list[JobOut]
    error: str = Field(default="", description="Why the trainer could not be read; empty when it could.")


class CheckpointOut(BaseModel):
    """A complete checkpoint of a job (trainer/jobs/checkpoint.py)."""

    step: int
    path: str
    fence: int = Field(description="The lease grant it was written under (0: no lease).")
    written: float = Field(description="When it was written, seconds since the epoch.")


class JobDetailOut(JobOut):
    """One job, what its update holds on its devices now, and its checkpoints."""

    device_memory: list[LedgerOut] = []
    checkpoints: list[CheckpointOut] = []


class CancelBody(BaseModel):
    """Cancel a job. A JSON body is required so that a cross-site form cannot send this request."""

    reason: str = Field(default="", max_length=200, description="Logged with the request.")

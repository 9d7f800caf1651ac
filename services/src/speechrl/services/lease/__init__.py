"""GPU turn-taking through a Redis lease queue: FIFO per device, fencing tokens, heartbeats."""

from speechrl.services.lease.lease import (
    PRIORITIES,
    GpuLease,
    Grant,
    LeaseError,
    LeaseLost,
    LeaseSettings,
    LeaseTimeout,
    LeaseUnavailable,
    declare_clean_start,
    lease_redis,
)

__all__ = ["PRIORITIES", "GpuLease", "Grant", "LeaseError", "LeaseLost", "LeaseSettings", "LeaseTimeout", "LeaseUnavailable",
           "declare_clean_start", "lease_redis"]

"""What the dashboard (/ui) shows, gathered server-side so the page needs one origin and one token.

    services.py  each service's health and GetServiceStatus, throughput from its item counter, and
                 latency, batch size and queue from its Prometheus /metrics (when configured)
    lease.py     per device: the Gantt segments of the lease's event stream, wait / hold percentiles,
                 queue, counters and the device-memory ledger
    jobs.py      the trainer's job API, proxied (list, one job, metrics, checkpoints, cancel)

`Sources.from_config` makes the clients once per app; `routes/dashboard.py` turns them into JSON.
"""

from speechrl.services.gateway.dashboard.sources import Sources

__all__ = ["Sources"]

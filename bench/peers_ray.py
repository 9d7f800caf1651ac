"""The three scorers under Ray Serve, batched with @serve.batch as verl users deploy a reward model.

    python bench/peers_ray.py --port P --report-dir DIR

Runs in its own environment (bench/peers.py makes it). A local Ray cluster (no dashboard) and one
application per scorer at /<scorer>, each a deployment of one replica whose request handler awaits a
`@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)` method (Ray's documented batching; the
batch counts requests, and one request may carry several items), and calls the engine in it as Ray's
batching guide does. max_ongoing_requests is raised to 128 so that 64 callers reach the batcher (the
default, 5, would cap every batch at 5 requests). Replies and requests are the gateway's JSON.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

import ray
from peers_serving import MAX_BATCH_SIZE, MAX_WAIT_S, SCORER_NAMES, from_json, split
from ray import serve
from starlette.requests import Request


class Scorer:
    """One scorer's engine behind Ray Serve's batching."""

    def __init__(self, scorer: str, report_dir: str):
        from peers_serving import build

        self.scorer = scorer
        self.score = build(scorer, "ray", report_dir)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=MAX_WAIT_S)
    async def score_requests(self, requests: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        results = self.score([item for items in requests for item in items])
        return split(results, [len(items) for items in requests])

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"results": await self.score_requests([from_json(self.scorer, i) for i in body["items"]])}


DEPLOYMENT = serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})(Scorer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--report-dir", required=True)
    args = parser.parse_args()
    # The replicas are worker processes of this cluster: they inherit this process's environment,
    # so the process settings bench/peers.py started it with (threads, allocator) hold there too.
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    for scorer in SCORER_NAMES:
        serve.run(DEPLOYMENT.bind(scorer, args.report_dir), name=scorer, route_prefix=f"/{scorer}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    ray.shutdown()  # the cluster, and with it Serve's controller, proxy and replicas


if __name__ == "__main__":
    main()

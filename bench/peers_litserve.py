"""The three scorers under LitServe with its batching.

    python bench/peers_litserve.py --port P --report-dir DIR

Runs in its own environment (bench/peers.py makes it). One LitAPI per scorer at /<scorer>
(`LitAPI(max_batch_size=32, batch_timeout=0.01)`: a batch counts requests, and one request may carry
several items), served by one LitServer on the CPU with one inference worker per API, its documented
high-throughput setting (fast_queue: ZeroMQ between the API server and the workers) and no request
timeout (its default, 30 s, is shorter than 64 callers wait on the ASR scorer). Requests and replies
are the gateway's JSON.
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls
from peers_serving import MAX_BATCH_SIZE, MAX_WAIT_S, SCORER_NAMES, BatchFn, build, from_json, split


class ScorerAPI(ls.LitAPI):
    """One scorer's engine; setup runs in the inference worker, which then runs every batch."""

    def __init__(self, scorer: str, report_dir: str):
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=MAX_WAIT_S, api_path=f"/{scorer}")
        self.scorer, self.report_dir = scorer, report_dir
        self.score: BatchFn | None = None

    def setup(self, device: str) -> None:
        self.score = build(self.scorer, "litserve", self.report_dir)

    # decode_request's `request` and encode_response's return stay unannotated, as LitServe's examples
    # have them: LitServe turns these annotations into the route's request and response models.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return [from_json(self.scorer, item) for item in request["items"]]

    def batch(self, inputs: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return inputs

    def predict(self, x: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        assert self.score is not None
        return split(self.score([item for items in x for item in items]), [len(items) for items in x])

    def unbatch(self, output: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return output

    def encode_response(self, output: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
        return {"results": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--report-dir", required=True)
    args = parser.parse_args()
    apis = [ScorerAPI(scorer, args.report_dir) for scorer in SCORER_NAMES]
    server = ls.LitServer(apis, accelerator="cpu", devices=1, workers_per_device=1, timeout=False, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()

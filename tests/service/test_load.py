"""Load: 64 concurrent clients against the rules service (and through the gateway) with no errors
but documented shedding. 15 s per target here to keep the suite short; `python bench/load.py`
runs the 60 s version and records it in bench/results/load.md."""

from __future__ import annotations

import asyncio

import pytest

from bench.load import SHED, grpc_ready, http_ready, load_grpc, load_http, rules_call, serve
from speechrl.services.ports import free_port

CLIENTS = 64
SECONDS = 15.0


@pytest.mark.slow
def test_64_clients_hold_for_15_s_against_rules_and_the_gateway() -> None:
    rules_port, gateway_port = free_port(), free_port()
    url = f"http://127.0.0.1:{gateway_port}"
    with serve("rules", "--port", str(rules_port), ready=grpc_ready(rules_port)):
        direct = asyncio.run(load_grpc("rules", rules_port, rules_call, CLIENTS, SECONDS))
        with serve("gateway", "--port", str(gateway_port), "--rules", f"127.0.0.1:{rules_port}", "--intelligibility",
                   "", "--speaker", "", "--log-level", "warning", ready=http_ready(f"{url}/readyz")):
            gateway = asyncio.run(load_http("gateway-rules", f"{url}/v1/rules/score", CLIENTS, SECONDS))
    for result in (direct, gateway):
        assert result.errors == 0, (result.target, dict(result.outcomes))
        assert result.outcomes["ok"] > 10 * CLIENTS, (result.target, dict(result.outcomes))  # every client served
        assert set(result.outcomes) <= {"ok", SHED}

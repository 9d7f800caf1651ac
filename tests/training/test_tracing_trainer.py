"""Tracing of a training step (SPEECHRL_TRACING): one `train.step` span per step with a child per phase,
the scorer calls of the score phase inside it down to the rules server's span."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.trace import SpanKind

from speechrl.trainer.jobs.registry import run_job
from tests.support.servers import RedisServer
from tests.support.tracing import ancestors, recording
from tests.support.training import Recorder, Stack, asr_job, asr_stack

PHASES = ["train.encode", "train.rollout", "train.score", "train.update", "train.sync"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from asr_stack(tmp_path_factory.mktemp("asr-tracing"))


def test_a_step_span_has_one_child_per_phase(stack: Stack, tmp_path: Path, redis_server: RedisServer) -> None:
    with recording() as exporter:
        run_job("asr-grpo", asr_job(stack, tmp_path / "run", 1, redis_server.url), Recorder())
        spans = exporter.get_finished_spans()
    (step,) = [s for s in spans if s.name == "train.step"]
    assert step.attributes is not None and step.attributes["speechrl.step"] == 1 and step.parent is None
    children = [s for s in spans if s.parent is not None and s.parent.span_id == step.context.span_id]
    assert sorted(s.name for s in children) == sorted(PHASES)
    assert all(step.start_time <= c.start_time and c.end_time <= step.end_time for c in children)  # type: ignore[operator]
    # The rules service's span for the rewards is in the step's trace, below the score phase.
    scored = [s for s in spans if s.kind == SpanKind.SERVER and s.name == "speechrl.v1.RuleRewards/ScoreRules"
              and s.context.trace_id == step.context.trace_id]
    assert scored and all(ancestors(s, spans)[-2:] == ["train.score", "train.step"] for s in scored)

"""Spans kept in memory: tracing on for one block, then off again as if it had never been set up."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from speechrl.services import tracing


@contextmanager
def recording(service_name: str = "speechrl-test") -> Iterator[InMemorySpanExporter]:
    """SPEECHRL_TRACING=1 and every span in the yielded exporter, as it ends."""
    assert not tracing.enabled(), "tracing was left on by an earlier test"
    saved = os.environ.get(tracing.SWITCH)
    os.environ[tracing.SWITCH] = "1"
    exporter = InMemorySpanExporter()
    try:
        assert tracing.setup(service_name, exporter)
        yield exporter
    finally:
        tracing.shutdown()
        if saved is None:
            del os.environ[tracing.SWITCH]
        else:
            os.environ[tracing.SWITCH] = saved
        # OpenTelemetry sets its global provider once per process; its own tests unset it like this, so
        # that FastAPI apps of later tests see no provider and open no spans.
        trace._TRACER_PROVIDER = None
        trace._TRACER_PROVIDER_SET_ONCE = Once()


def ancestors(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[str]:
    """The names of span's recorded ancestors, nearest first."""
    by_id = {s.context.span_id: s for s in spans}
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names

"""Fixtures of the whole suite (real espeak-ng speech, free ports, a private Redis) and its tiers:
each test gets the marker of the folder it lives in (unit, service, training, equivalence, compose), so
`pytest -m unit` runs one tier. Helpers live in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from speechrl.services.espeak import EspeakSynthesizer
from speechrl.services.ports import free_port
from tests.support.servers import RedisServer

TIERS = ("unit", "service", "training", "equivalence", "compose")


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> EspeakSynthesizer:
    """Real espeak-ng speech: `speech.wav(text, voice, rate, pitch)` -> WAV bytes, `speech.path(...)`."""
    return EspeakSynthesizer(tmp_path_factory.mktemp("speech"))


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    server.declare_clean()
    yield server
    server.stop()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    # Doctests of the generated stubs' package have nothing to run; keep the listing clean.
    items[:] = [i for i in items if "_pb2" not in str(getattr(i, "fspath", ""))]
    tests = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        tier = path.relative_to(tests).parts[0] if path.is_relative_to(tests) else "unit"  # doctests: units
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))

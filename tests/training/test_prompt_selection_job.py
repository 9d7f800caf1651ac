"""prompt_selection in a real asr-grpo job through the services: the job trains only on the rows its
selection keeps, hard cases judged against Whisper tiny.en (the intelligibility service) and the
policy's own greedy transcripts, keyword-rich rows by their keywords; a resumed job keeps its prompts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from speechrl.client import IntelligibilityClient
from speechrl.services.intelligibility.server import IntelligibilityConfig, start
from speechrl.services.ports import free_port
from speechrl.trainer.jobs import asr
from speechrl.trainer.jobs.datasets import Row, read_manifest, write_manifest
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from tests.support.servers import RedisServer, serve_in_thread
from tests.support.training import Recorder, Stack, asr_job, asr_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from asr_stack(tmp_path_factory.mktemp("selection"))


@pytest.fixture(scope="module")
def whisper() -> Iterator[str]:
    """The intelligibility service with its default model (faster-whisper tiny.en)."""
    with serve_in_thread(lambda: start(IntelligibilityConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Candidate prompts: training utterances, half from the keyword templates, and a long repeat."""
    return build_asr_dataset(DataConfig(out=str(tmp_path_factory.mktemp("candidates")), seed=2, train=8, dev=2,
                                        test=0, joined=0, long_test=0, long_repeat=1, keyword_rich_fraction=0.5,
                                        voices="en-us", long_min_seconds=6.0, long_max_seconds=12.0,
                                        long_gap_seconds=1.0), progress=False)


def record_draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[set[str], list[str]]]:
    """Every step's draw: (the ids it drew from, the ids drawn)."""
    draws: list[tuple[set[str], list[str]]] = []
    draw = asr.draw_prompts

    def recording(rows: list[Row], count: int, by_split: bool = False) -> list[Row]:
        drawn = draw(rows, count, by_split)
        draws.append(({r.id for r in rows}, [r.id for r in drawn]))
        return drawn

    monkeypatch.setattr(asr, "draw_prompts", recording)
    return draws


def whisper_items(endpoint: str) -> int:
    with IntelligibilityClient(endpoint) as client:
        return client.get_service_status().items_processed


def test_a_hard_job_trains_on_the_rows_whisper_and_the_policy_disagree_on(
        stack: Stack, corpus: Path, whisper: str, tmp_path: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    draws = record_draws(monkeypatch)
    candidates = read_manifest(corpus, "train,long_repeat")
    out = tmp_path / "hard"
    config = replace(asr_job(stack, out, 2, redis_server.url), data=str(corpus), train_split="train,long_repeat",
                     prompt_selection="hard", prompt_count=3, intelligibility=whisper)
    heard = whisper_items(whisper)
    recorder = Recorder()
    run_job("asr-grpo", config, recorder)
    assert whisper_items(whisper) - heard == len(candidates), "Whisper transcribed every candidate once"
    chosen = json.loads((out / asr.PROMPTS_FILE).read_text())
    assert chosen["settings"]["prompt_selection"] == "hard" and len(chosen["ids"]) == 3
    assert "long_repeat-00000" in chosen["ids"], "a long segment that says a sentence twice is a hard case"
    assert len(draws) == 2 and all(pool == set(chosen["ids"]) and set(drawn) <= pool for pool, drawn in draws)
    first = recorder.steps[0][1]
    assert first["prompts"] == 3 and first["time/select"] > 0 and "prompts" not in recorder.steps[1][1]

    resumed = Recorder()
    run_job("asr-grpo", replace(config, steps=3), resumed)
    assert [s for s, _ in resumed.steps] == [3] and resumed.steps[0][1]["prompts"] == 3
    assert whisper_items(whisper) - heard == len(candidates), "the resumed job kept its prompts: no new transcripts"
    assert draws[-1][0] == set(chosen["ids"])


def test_a_keyword_job_trains_only_on_keyword_rich_rows(stack: Stack, corpus: Path, tmp_path: Path,
                                                        redis_server: RedisServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    draws = record_draws(monkeypatch)
    rows = read_manifest(corpus, "train")
    rich = {r.id for r in rows if len(r.keywords) >= 2}
    assert 0 < len(rich) < len(rows), "the corpus has both kinds of rows"
    out = tmp_path / "keyword"
    recorder = Recorder()
    run_job("asr-grpo", replace(asr_job(stack, out, 2, redis_server.url), data=str(corpus), train_split="train",
                                prompt_selection="keyword"), recorder)
    assert set(json.loads((out / asr.PROMPTS_FILE).read_text())["ids"]) == rich
    assert len(draws) == 2 and all(pool == rich and set(drawn) <= rich for pool, drawn in draws)
    assert recorder.steps[0][1]["prompts"] == len(rich)

    # A selection that keeps nothing stops the job with what to change, before any update.
    plain = write_manifest(tmp_path / "plain.jsonl", [r for r in rows if r.id not in rich])
    with pytest.raises(ValueError, match="kept none of the .* rows of train_split 'train'"):
        run_job("asr-grpo", replace(asr_job(stack, tmp_path / "none", 2, redis_server.url), data=str(plain),
                                    prompt_selection="keyword"), Recorder())

"""The data-construction ablation's pieces: the prompt_selection dispatch over rows (D0 random, D1 hard,
D2 under 20 s, D3 keyword-rich), its checks in the job config, and long segments that say a sentence twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile

from speechrl.trainer.jobs.asr import AsrJobConfig
from speechrl.trainer.jobs.datasets import Row, read_manifest
from speechrl.trainer.jobs.selection import pick_prompts, says_a_sentence_twice, select_hard_cases
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset


def row(i: int, duration: float = 3.0, keywords: tuple[str, ...] = (), sources: tuple[str, ...] = ()) -> Row:
    return Row(id=f"r{i}", audio=f"/x/{i}.wav", text=f"sentence number {i}", voice="en-us", rate=160,
               duration=duration, keywords=keywords, split="rl_pool", sources=sources)


ROWS = [row(0), row(1, 25.0, ("insulin", "router")), row(2, 19.9), row(3, 4.0, ("latency", "router", "voltage")),
        row(4, 22.0, sources=("t-1", "t-2", "t-2", "t-3")), row(5, 5.0, ("insulin",)), row(6), row(7, 18.0)]


def ids(rows: list[Row]) -> list[str]:
    return [r.id for r in rows]


def test_each_selection_keeps_its_rows() -> None:
    assert pick_prompts(ROWS, "all") == ROWS
    assert ids(pick_prompts(ROWS, "short")) == ["r0", "r2", "r3", "r5", "r6", "r7"]
    assert ids(pick_prompts(ROWS, "keyword")) == ["r1", "r3"]
    random3 = pick_prompts(ROWS, "random", count=3, seed=1)
    assert len(random3) == 3 and random3 == pick_prompts(ROWS, "random", count=3, seed=1)
    assert ids(random3) == sorted(ids(random3)), "manifest order is kept"
    assert {len({r.id for r in pick_prompts(ROWS, "random", 3, seed)}) for seed in range(5)} == {3}
    assert len({tuple(ids(pick_prompts(ROWS, "random", 3, seed))) for seed in range(5)}) > 1, "the seed draws"
    # A count draws that many of the rows a selection keeps, at random; never rows it does not keep.
    short2 = pick_prompts(ROWS, "short", count=2, seed=0)
    assert len(short2) == 2 and all(r.duration < 20 for r in short2)
    assert pick_prompts(ROWS, "keyword", count=5) == pick_prompts(ROWS, "keyword"), "fewer kept than count: all"


def test_hard_cases_are_the_most_disagreeing_and_the_long_repeats() -> None:
    whisper = [r.text for r in ROWS]
    policy = list(whisper)
    policy[1] = "sentence number"  # WER 0.33 against Whisper's
    policy[6] = "a different thing"  # WER 1
    policy[7] = "sentence"  # WER 0.67; the others agree (0)
    hard = pick_prompts(ROWS, "hard", hypotheses=(whisper, policy))
    assert ids(hard) == ["r1", "r4", "r6", "r7"], "disagreement > 0.2, and r4, which says a sentence twice"
    assert says_a_sentence_twice(ROWS[4]) and not says_a_sentence_twice(ROWS[1])
    # With a count: the long repeats first, then the widest disagreement, in manifest order.
    assert ids(pick_prompts(ROWS, "hard", count=2, hypotheses=(whisper, policy))) == ["r4", "r6"]
    assert ids(pick_prompts(ROWS, "hard", count=3, hypotheses=(whisper, policy))) == ["r4", "r6", "r7"]
    assert ids(select_hard_cases(ROWS, whisper, policy, min_disagreement=0.5)) == ["r4", "r6", "r7"]
    with pytest.raises(ValueError, match="two systems' transcripts"):
        pick_prompts(ROWS, "hard")


def test_the_job_config_checks_its_selection() -> None:
    base = AsrJobConfig(policy="p", data="d")
    assert base.prompt_selection == "all" and base.prompt_count == 0, "today's behaviour by default"
    for change, message in (({"prompt_selection": "random"}, "set prompt_count > 0"),
                            ({"prompt_selection": "hard"}, "set intelligibility"),
                            ({"prompt_selection": "all", "prompt_count": 8}, "use prompt_selection random"),
                            ({"prompt_selection": "keyword", "prompt_count": -1}, "prompt_count must be >= 0"),
                            ({"prompt_selection": "hardest"}, "prompt_selection must be one of")):
        with pytest.raises(ValueError, match=message):
            replace(base, **change)
    assert replace(base, prompt_selection="hard", intelligibility="127.0.0.1:50051", prompt_count=8).prompt_count == 8


def small(out: Path, long_repeat: int = 0) -> DataConfig:
    return DataConfig(out=str(out), seed=5, train=12, dev=1, test=1, voices="en-us,en-gb+f3", joined=0, long_test=0,
                      long_train=2, long_repeat=long_repeat, long_min_seconds=6.0, long_max_seconds=16.0,
                      long_gap_seconds=1.0)


def test_long_repeats_say_one_sentence_twice_in_a_row(tmp_path: Path) -> None:
    rows = read_manifest(build_asr_dataset(small(tmp_path / "with", long_repeat=3), progress=False))
    by_id = {r.id: r for r in rows}
    repeats = [r for r in rows if r.split == "long_repeat"]
    assert len(repeats) == 3
    inside = 0  # repeats with an utterance after them
    for segment in repeats:
        sources = [by_id[i] for i in segment.sources]
        assert len(sources) >= 2 and all(s.split == "train" and s.voice == segment.voice for s in sources)
        twice = [j for j in range(len(sources) - 1) if sources[j].id == sources[j + 1].id]
        assert len(twice) == 1 and len(set(segment.sources)) == len(segment.sources) - 1, "one sentence, said twice"
        assert says_a_sentence_twice(segment)
        assert segment.text == " ".join(s.text for s in sources)
        assert 6.0 <= segment.duration <= 16.0
        inside += twice[0] + 2 < len(sources)
        # The audio says it twice: the same samples, a 1 s pause between.
        audio, rate = soundfile.read(segment.audio, dtype="float32")
        spoken, _ = soundfile.read(sources[twice[0]].audio, dtype="float32")
        start = sum(round(s.duration * rate) + rate for s in sources[:twice[0]])
        first, second = audio[start:start + len(spoken)], audio[start + len(spoken) + rate:start + 2 * len(spoken) + rate]
        assert np.allclose(first, spoken, atol=1e-4) and np.allclose(second, spoken, atol=1e-4)
        assert not audio[start + len(spoken):start + len(spoken) + rate].any()
    assert inside, "the repeated utterance is drawn, not always the last"
    # The other splits are what they were without repeats.
    without = read_manifest(build_asr_dataset(small(tmp_path / "without"), progress=False))
    assert [(r.id, r.text, r.sources) for r in without] == [(r.id, r.text, r.sources) for r in rows
                                                             if r.split != "long_repeat"]
    assert not any(says_a_sentence_twice(r) for r in without)

"""ASR data construction: the espeak-ng corpus, the RL-data selectors, long segments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from speechrl.trainer.jobs.datasets import MANIFEST, Row, read_manifest, write_manifest
from speechrl.trainer.jobs.selection import (
    hypothesis_disagreement,
    select_hard_cases,
    select_informative_groups,
    select_keyword_rich,
    select_max_duration,
    select_random,
)
from speechrl.trainer.recipes.asr_data import (
    KEYWORDS,
    DataConfig,
    build_asr_dataset,
    build_long_segments,
    generate_sentences,
)


def small(out: Path, seed: int = 3) -> DataConfig:
    # Two voices so that each has a few consecutive test utterances to join.
    return DataConfig(out=str(out), seed=seed, train=6, dev=3, test=8, voices="en-us,en-gb+f3", long_test=2,
                      long_min_seconds=4.0, long_max_seconds=12.0, long_gap_seconds=2.0, keyword_rich_fraction=0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_asr_dataset(small(tmp_path_factory.mktemp("corpus")), progress=False)


def test_splits_are_disjoint_short_and_complete(corpus: Path) -> None:
    rows = read_manifest(corpus)
    by_split = {split: [r for r in rows if r.split == split] for split in ("train", "dev", "test", "long")}
    assert [len(by_split[s]) for s in ("train", "dev", "test")] == [6, 3, 8] and by_split["long"]
    texts = {split: {r.text for r in part} for split, part in by_split.items() if split != "long"}
    joined = [r for r in rows if r.split == "joined"]
    assert all(6.0 <= r.duration <= 14.0 and {s.split("-")[0] for s in r.sources} == {"train"} for r in joined)
    assert not (texts["train"] & texts["dev"] or texts["train"] & texts["test"] or texts["dev"] & texts["test"])
    assert len({r.id for r in rows}) == len(rows)
    for row in rows:
        info = soundfile.info(row.audio)
        assert info.samplerate == 16_000 and info.channels == 1
        assert row.duration == pytest.approx(info.frames / 16_000)
        if row.split in ("train", "dev", "test"):
            assert row.keywords == tuple(w for w in row.text.split() if w in KEYWORDS)
            assert 0.5 < row.duration < 20 and 140 <= row.rate <= 190 and row.voice in ("en-us", "en-gb+f3")


def test_same_seed_same_corpus(corpus: Path, tmp_path: Path) -> None:
    again = build_asr_dataset(small(tmp_path / "again"), progress=False)
    assert again.read_text() == corpus.read_text(), "audio paths are relative, so the manifests match byte for byte"
    for first, second in zip(read_manifest(corpus), read_manifest(again), strict=True):
        assert Path(first.audio).read_bytes() == Path(second.audio).read_bytes()
    other = build_asr_dataset(DataConfig(out=str(tmp_path / "other"), seed=4, train=6, dev=3, test=8, long_test=0),
                              progress=False)
    assert {r.text for r in read_manifest(other)} != {r.text for r in read_manifest(corpus)}


def test_recorded_splits_put_silence_around_the_tight_utterances(corpus: Path, tmp_path: Path) -> None:
    """dev_recorded / test_recorded: the tight dev and test utterances with 0.2..edge_silence_seconds of
    silence on each side (where a warm start trained on tight audio invents words); rl_pool: its own
    sentences, recorded the same way; train stays tight. Off by default."""
    assert {r.split for r in read_manifest(corpus)} == {"train", "dev", "test", "joined", "long"}
    rows = read_manifest(build_asr_dataset(DataConfig(out=str(tmp_path), seed=3, train=2, dev=2, test=2, rl_pool=2,
                                                      voices="en-us", joined=0, long_test=0, edge_silence_seconds=1.0),
                                           progress=False))
    by_split: dict[str, list[Row]] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    assert {split: len(part) for split, part in by_split.items()} == {
        "train": 2, "dev": 2, "test": 2, "rl_pool": 2, "dev_recorded": 2, "test_recorded": 2}
    tight_texts = {r.text for split in ("train", "dev", "test") for r in by_split[split]}
    assert not {r.text for r in by_split["rl_pool"]} & tight_texts, "RL prompts are not warm-start sentences"

    def silence_around(audio: np.ndarray, speech: np.ndarray | None) -> tuple[float, float]:
        before = int(np.flatnonzero(audio)[0]) - (0 if speech is None else int(np.flatnonzero(speech)[0]))
        length = len(audio) - before - (0 if speech is None else len(speech))
        if speech is not None:
            assert np.array_equal(audio[before:before + len(speech)], speech), "the tight samples, unchanged"
        return before / 16_000, length / 16_000

    for tight, recorded in [*zip(by_split["dev"], by_split["dev_recorded"], strict=True),
                            *zip(by_split["test"], by_split["test_recorded"], strict=True)]:
        assert (recorded.text, recorded.id) == (tight.text, tight.id.replace(tight.split, recorded.split))
        before, after = silence_around(soundfile.read(recorded.audio, dtype="float32")[0],
                                       soundfile.read(tight.audio, dtype="float32")[0])
        assert 0.2 <= before <= 1.0 and 0.2 <= after <= 1.0
        assert recorded.duration == pytest.approx(tight.duration + before + after, abs=1e-3)
    for pooled in by_split["rl_pool"]:
        audio = soundfile.read(pooled.audio, dtype="float32")[0]
        assert not audio[:int(0.2 * 16_000)].any() and not audio[-int(0.2 * 16_000):].any()


def test_long_segments_join_references_and_audio(corpus: Path) -> None:
    rows = {r.id: r for r in read_manifest(corpus)}
    long = [r for r in rows.values() if r.split == "long"]
    for segment in long:
        sources = [rows[i] for i in segment.sources]
        assert len(sources) >= 2 and all(s.split == "test" and s.voice == segment.voice for s in sources)
        assert segment.text == " ".join(s.text for s in sources)
        assert segment.duration == pytest.approx(sum(s.duration for s in sources) + 2.0 * (len(sources) - 1), abs=1e-3)
        # The long_gap_seconds pause after the first source is silence (where the warm start invents words).
        audio, rate = soundfile.read(segment.audio, dtype="float32")
        first = round(sources[0].duration * rate)
        assert not audio[first:first + 2 * rate].any()
        assert 4.0 <= segment.duration <= 12.0
        assert segment.keywords == tuple(dict.fromkeys(k for s in sources for k in s.keywords))
    # Sources are consecutive utterances of their voice, in manifest order.
    test_ids = [r.id for r in rows.values() if r.split == "test"]
    for segment in long:
        voice_ids = [i for i in test_ids if rows[i].voice == segment.voice]
        start = voice_ids.index(segment.sources[0])
        assert list(segment.sources) == voice_ids[start:start + len(segment.sources)]


def test_long_builder_respects_bounds(tmp_path: Path, corpus: Path) -> None:
    train = read_manifest(corpus, "train")
    segments = build_long_segments(train, tmp_path, split="joined", min_seconds=3.0, max_seconds=9.0, gap_seconds=0.5)
    assert segments and all(3.0 <= s.duration <= 9.0 and s.split == "joined" for s in segments)
    assert [s.id for s in segments] == [f"joined-{i:05d}" for i in range(len(segments))]
    assert build_long_segments(train, tmp_path, min_seconds=3.0, max_seconds=9.0, limit=1)[0].sources == \
        segments[0].sources


def row(i: int, text: str, duration: float = 3.0, keywords: tuple[str, ...] = ()) -> Row:
    return Row(id=f"r{i}", audio=f"/x/{i}.wav", text=text, voice="en-us", rate=160, duration=duration,
               keywords=keywords)


def test_hard_cases_from_disagreeing_hypotheses() -> None:
    rows = [row(0, "grace moved the red box"), row(1, "bob sold two cups"), row(2, "leo fixed the old lamp"),
            row(3, "the insulin report")]
    system_a = ["grace moved the red box", "bob sold two cups", "leo fixed the lamp", ""]
    system_b = ["grace moved the red box", "bob told you cups", "leo fixed the lamp", "the insulin report"]
    assert hypothesis_disagreement("", "") == 0.0 and hypothesis_disagreement("", "a word") == 1.0
    assert [r.id for r in select_hard_cases(rows, system_a, system_b, min_disagreement=0.2)] == ["r1", "r3"]
    # The baseline's own errors: r2 drops a word (WER 0.2), r3 is empty (WER 1).
    assert [r.id for r in select_hard_cases(rows, system_a, min_wer=0.1)] == ["r2", "r3"]
    assert [r.id for r in select_hard_cases(rows, system_a, system_b, min_wer=0.1)] == ["r1", "r2", "r3"]
    with pytest.raises(ValueError, match="one hypothesis per row"):
        select_hard_cases(rows, system_a[:2], system_b)
    with pytest.raises(ValueError, match="second hypothesis list"):
        select_hard_cases(rows, system_a)


def test_informative_groups_keep_the_widest_reward_spread() -> None:
    rows = [row(i, str(i), 3.0) for i in range(4)]
    groups = [[1.0, 1.0, 1.0], [0.0, 1.0, None], [0.5, 0.6, 0.5], [0.2, None, None]]
    # r0: all alike (no GRPO signal); r3: one scored sample; r1 spreads wider than r2.
    assert [r.id for r in select_informative_groups(rows, groups)] == ["r1", "r2"]
    assert [r.id for r in select_informative_groups(rows, groups, count=1)] == ["r1"]
    with pytest.raises(ValueError, match="one group of rewards per row"):
        select_informative_groups(rows, groups[:2])


def test_prompt_pool_keeps_a_quota_of_long_segments() -> None:
    from dataclasses import replace

    from speechrl.trainer.recipes.reproduce import keep_prompts

    short = [row(i, str(i), 3.0) for i in range(4)]
    long = [replace(row(i, str(i), 20.0), split="long_train") for i in range(4, 7)]
    groups = [[0.0, 1.0]] * 4 + [[0.4, 0.5], [0.45, 0.5], [0.5, 0.5]]  # the long ones spread least; r6 not at all
    assert [r.id for r in keep_prompts(short + long, groups, pool=3)] == ["r0", "r1", "r2"]
    kept = keep_prompts(short + long, groups, pool=4, long_pool=3)
    assert [r.id for r in kept] == ["r4", "r5", "r0", "r1"]  # only 2 long ones informative, the rest short


def test_reproduction_picks_its_step_on_dev_as_recorded_where_the_corpus_has_it() -> None:
    from dataclasses import replace

    from speechrl.trainer.recipes.reproduce import dev_split

    tight = [replace(row(0, "a"), split="dev"), replace(row(1, "b"), split="test")]
    assert dev_split(tight) == "dev"
    assert dev_split([*tight, replace(row(2, "a"), split="dev_recorded")]) == "dev_recorded"


def test_keyword_length_and_random_selectors() -> None:
    rows = [row(0, "a", 3.0, ("insulin",)), row(1, "b", 25.0, ("insulin", "router")), row(2, "c", 19.9),
            row(3, "d", 4.0, ("latency", "router", "voltage"))]
    assert [r.id for r in select_keyword_rich(rows, 2)] == ["r1", "r3"]
    assert [r.id for r in select_keyword_rich(rows, 1)] == ["r0", "r1", "r3"]
    assert [r.id for r in select_max_duration(rows, 20.0)] == ["r0", "r2", "r3"]
    picked = select_random(rows, 2, seed=1)
    assert len(picked) == 2 and picked == select_random(rows, 2, seed=1)
    assert [r.id for r in picked] == sorted(r.id for r in picked), "manifest order is kept"
    assert select_random(rows, 10) == rows


def test_sentences_and_manifest_round_trip(tmp_path: Path) -> None:
    sentences = generate_sentences(200, seed=0, keyword_rich_fraction=0.3)
    assert len({text for text, _ in sentences}) == 200
    rich = [kw for _, kw in sentences if len(kw) >= 2]
    assert 0.2 < len(rich) / 200 < 0.4
    assert all(len(text.split()) <= 16 for text, _ in sentences)
    rows = [row(0, "grace moved the red box", keywords=("insulin",))]
    rows[0] = Row(**{**rows[0].__dict__, "audio": str(tmp_path / "wav" / "a.wav"), "sources": ("x", "y")})
    path = write_manifest(tmp_path / MANIFEST, rows)
    assert '"audio": "wav/a.wav"' in path.read_text()
    assert read_manifest(tmp_path) == rows
    with pytest.raises(ValueError, match="long segments"):
        DataConfig(long_max_seconds=31)

"""Mean and spread over seeds, and the demo's check of the paper's direction, on hand-made tables."""

from __future__ import annotations

import pytest

from speechrl.trainer.recipes.demo import direction_checks
from speechrl.trainer.recipes.reporting import mean_spread, over_seeds, parse_seeds
from speechrl.trainer.recipes.reproduce import BASELINE, markdown_table, seed_summaries


def scores(recorded: float, tight: float, long_insertions: float) -> dict[str, float]:
    return {"test_recorded/wer": recorded, "test/wer": tight, "long/insertions": long_insertions, "step": 10.0}


def results_of(table: dict[str, dict[str, float]]) -> dict:
    summary = seed_summaries(table, ["R1+R2"], [0, 1, 2])
    return {"table": table, "over_seeds": summary}


def test_over_seeds_is_the_mean_and_the_sample_spread() -> None:
    summary = over_seeds([{"a": 1.0, "b": 5.0}, {"a": 2.0}, {"a": 3.0}])
    assert summary == {"a": (2.0, 1.0)}  # b is not in every run; ddof 1: std of 1, 2, 3 is 1
    assert over_seeds([{"a": 0.5}]) == {"a": (0.5, 0.0)}
    assert mean_spread((0.51234, 0.0312)) == "0.512 ± 0.031"
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,0", "a"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_the_table_carries_every_seed_and_their_mean() -> None:
    table = {BASELINE: scores(0.9, 0.6, 1.0), "R1+R2, seed 0": scores(0.7, 0.6, 0.2),
             "R1+R2, seed 1": scores(0.8, 0.62, 0.4), "R1+R2, seed 2": scores(0.9, 0.64, 0.0)}
    text = markdown_table(table, 7.5, summary=seed_summaries(table, ["R1+R2"], [0, 1, 2]))
    assert "| R1+R2, seed 2 | 0.900 |" in text
    assert "| R1+R2 | 0.800 ± 0.100 |" in text and "0.200 ± 0.200" in text  # long insertions 0.2, 0.4, 0


def test_the_direction_holds_only_when_every_seed_lowers_long_insertions_and_wer_stays_in_the_band() -> None:
    base = scores(0.9, 0.60, 1.0)
    holds = results_of({BASELINE: base, "R1+R2, seed 0": scores(0.7, 0.60, 0.2),
                        "R1+R2, seed 1": scores(0.8, 0.62, 0.4), "R1+R2, seed 2": scores(0.9, 0.64, 0.0)})
    assert [held for held, _ in direction_checks(holds)] == [True, True, True]  # tight 0.62 ± 0.02 vs 0.60
    one_seed_up = results_of({BASELINE: base, "R1+R2, seed 0": scores(0.7, 0.60, 0.2),
                              "R1+R2, seed 1": scores(0.8, 0.62, 1.5), "R1+R2, seed 2": scores(0.9, 0.64, 0.0)})
    assert [held for held, _ in direction_checks(one_seed_up)] == [False, True, True]
    tight_up = results_of({BASELINE: base, "R1+R2, seed 0": scores(0.7, 0.70, 0.2),
                           "R1+R2, seed 1": scores(0.8, 0.71, 0.4), "R1+R2, seed 2": scores(0.9, 0.72, 0.0)})
    checks = direction_checks(tight_up)
    assert [held for held, _ in checks] == [True, True, False] and "more than the spread" in checks[2][1]
    single = {"table": {BASELINE: base, "R1+R2": scores(0.8, 0.61, 0.5)}, "over_seeds": {}}
    assert [held for held, _ in direction_checks(single)] == [True, True, False]  # one seed: no band to hide in

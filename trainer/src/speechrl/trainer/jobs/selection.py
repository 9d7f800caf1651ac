"""Which rows of a manifest a job trains on: the RL-data selectors of arXiv 2509.18569 (section on RL
data construction) and the job option that picks one (AsrJobConfig.prompt_selection).

The paper's data sets, each a selector over the same candidate rows:

    D0  random       select_random: no targeting; what RL gains from the data alone
    D1  hard         select_hard_cases: rows where two systems disagree (the policy's greedy transcript
                     against Whisper's), and long segments that say a sentence twice (long repeats)
    D2  short        select_max_duration: audio under 20 s
    D3  keyword      select_keyword_rich: references with rare domain words, where R3 has signal

They live here, under jobs, because a job applies them at its start (jobs/asr.py); the corpus recipe
(recipes/asr_data.py) builds the rows they choose from.

>>> rows = [Row(id=f"r{i}", audio="", text="a", voice="en-us", rate=160, duration=d, keywords=k)
...         for i, (d, k) in enumerate(((3.0, ()), (25.0, ("insulin", "router")), (4.0, ("latency", "voltage"))))]
>>> [r.id for r in pick_prompts(rows, "short")], [r.id for r in pick_prompts(rows, "keyword")]
(['r0', 'r2'], ['r1', 'r2'])
>>> len(pick_prompts(rows, "random", count=2, seed=0))
2
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from speechrl.rewards import error_rates, normalize_text
from speechrl.trainer.jobs.datasets import Row

PromptSelection = Literal["all", "random", "hard", "short", "keyword"]
MAX_SECONDS = 20.0  # D2's bound: the paper keeps RL audio under 20 s
MIN_KEYWORDS = 2  # D3: a keyword-rich reference holds at least this many keywords
MIN_DISAGREEMENT = 0.2  # D1: a row is hard when the two systems' transcripts differ by a WER above this


def select_random(rows: Sequence[Row], count: int, seed: int = 0) -> list[Row]:
    """A uniform random subset of count rows (all when there are fewer), in manifest order.

    Why: the paper's baseline RL set; it shows what RL gains without any targeting of the data.
    """
    if count >= len(rows):
        return list(rows)
    keep = set(random.Random(seed).sample(range(len(rows)), count))
    return [row for i, row in enumerate(rows) if i in keep]


def hypothesis_disagreement(first: str, second: str) -> float:
    """WER of second against first as the reference (normalised text); 1 when exactly one is empty."""
    if not normalize_text(first).strip():
        return 0.0 if not normalize_text(second).strip() else 1.0
    return error_rates(second, first).wer


def says_a_sentence_twice(row: Row) -> bool:
    """Whether row is a long segment that says one of its sentences again (a source joined twice,
    recipes/asr_data.build_long_segments with repeat=True): a hard case by construction."""
    return len(set(row.sources)) < len(row.sources)


def select_hard_cases(rows: Sequence[Row], first: Sequence[str], second: Sequence[str] | None = None, *,
                      min_disagreement: float = MIN_DISAGREEMENT, min_wer: float | None = None,
                      count: int | None = None) -> list[Row]:
    """Rows where two systems disagree, or where the baseline is wrong, and the long repeats: the hard cases.

    first[i] and second[i] are hypotheses of rows[i] from two ASR systems (e.g. Whisper and the
    policy) or two checkpoints of the policy. A row is hard when WER(second | first as reference) >
    min_disagreement, or, with min_wer set, when the baseline `first` has WER > min_wer against the
    row's reference, or when it says a sentence twice (says_a_sentence_twice: long repeats, where an
    LLM-ASR drops the second saying or loops). With count, the count hard rows that disagree most
    are kept (long repeats first, then by disagreement or baseline WER), in manifest order. Why: GRPO learns only from groups whose
    rewards differ; utterances that every sample already gets right give zero advantage, so the
    paper spends its RL data on the utterances the models are unsure about, which is where
    disagreement and high WER point.
    """
    if len(first) != len(rows) or (second is not None and len(second) != len(rows)):
        raise ValueError(f"need one hypothesis per row: {len(rows)} rows, {len(first)} first, "
                         f"{len(second) if second is not None else 0} second")
    if second is None and min_wer is None:
        raise ValueError("give a second hypothesis list, a min_wer, or both")
    hardness: dict[int, float] = {}
    for i, row in enumerate(rows):
        disagreement = hypothesis_disagreement(first[i], second[i]) if second is not None else 0.0
        error = error_rates(first[i], row.text).wer if min_wer is not None else 0.0
        if says_a_sentence_twice(row):
            hardness[i] = math.inf
        elif disagreement > min_disagreement or (min_wer is not None and error > min_wer):
            hardness[i] = max(disagreement, error)
    kept = sorted(hardness, key=lambda i: -hardness[i])[:count]
    return [rows[i] for i in sorted(kept)]


def select_informative_groups(rows: Sequence[Row], group_rewards: Sequence[Sequence[float | None]],
                              count: int | None = None, min_std: float = 1e-6) -> list[Row]:
    """The rows whose G sampled hypotheses earned different rewards, the widest spread first.

    group_rewards[i] holds the rewards of G samples of rows[i] from the policy about to be trained
    (None: unscored, skipped). A row is kept when the standard deviation of its rewards exceeds
    min_std; the count rows with the largest deviation are returned, in manifest order. Why: GRPO's
    advantage is (r - mean) / std within a group, so a prompt whose samples all score alike gives
    zero gradient; spending the RL steps on the prompts the policy is unsure about is what the
    paper's hard-case selection aims at, measured here directly on the policy's own samples.
    """
    if len(group_rewards) != len(rows):
        raise ValueError(f"need one group of rewards per row: {len(rows)} rows, {len(group_rewards)} groups")
    spread = {}
    for i, rewards in enumerate(group_rewards):
        scored = [r for r in rewards if r is not None]
        if len(scored) > 1 and float(np.std(scored)) > min_std:
            spread[i] = float(np.std(scored))
    kept = sorted(spread, key=lambda i: -spread[i])[:count]
    return [rows[i] for i in sorted(kept)]


def select_max_duration(rows: Sequence[Row], max_seconds: float = MAX_SECONDS) -> list[Row]:
    """Rows shorter than max_seconds.

    Why: the paper caps RL audio at 20 s; longer inputs cost memory quadratically in attention and
    fall outside what the warm start saw (long inputs are studied on their own, see long segments).
    """
    return [row for row in rows if row.duration < max_seconds]


def select_keyword_rich(rows: Sequence[Row], min_keywords: int = MIN_KEYWORDS) -> list[Row]:
    """Rows whose reference holds at least min_keywords keywords.

    Why: the keyword reward (R3: keyword precision and recall) only has signal where there are
    keywords; a set rich in rare domain words is where the paper trains and measures it.
    """
    return [row for row in rows if len(row.keywords) >= min_keywords]


# The selections that need nothing but the rows; "random" draws its count from all of them.
FILTERS: dict[str, Callable[[Sequence[Row]], list[Row]]] = {
    "all": list, "random": list, "short": select_max_duration, "keyword": select_keyword_rich}


def pick_prompts(rows: Sequence[Row], selection: PromptSelection, count: int = 0, seed: int = 0,
                 hypotheses: tuple[Sequence[str], Sequence[str]] | None = None) -> list[Row]:
    """The rows of a job's prompts under a selection (the module docstring's D0-D3), at most count of
    them (0: every row the selection keeps), in manifest order.

    "hard" needs hypotheses = (Whisper's transcripts, the policy's greedy transcripts), one each per
    row, and keeps the count hardest (select_hard_cases); the others keep count of their rows at
    random (select_random with seed).
    """
    if selection == "hard":
        if hypotheses is None:
            raise ValueError("the hard selection needs two systems' transcripts of every row (hypotheses)")
        return select_hard_cases(rows, *hypotheses, count=count or None)
    kept = FILTERS[selection](rows)
    return select_random(kept, count, seed) if count else kept

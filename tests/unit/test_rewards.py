"""Pure reward math: normalisation, error rates, mappings and the paper's R1/R2/R3."""

from __future__ import annotations

import math

import pytest

from speechrl.rewards import RuleRewardConfig, error_rates, normalize_text, rule_rewards, similarity_reward, wer_reward
from speechrl.rewards.asr_rules import dominant_script, looped_words
from speechrl.rewards.wer import EmptyReference


def test_normalisation_makes_formatting_irrelevant() -> None:
    assert error_rates("Hello, World!", "hello world").wer == 0.0
    assert error_rates("it's twenty five", "It is 25.").wer == 0.0


def test_wrong_transcript_has_high_wer_and_counts_add_up() -> None:
    r = error_rates("completely different words here", "the cat sat on the mat")
    assert r.wer >= 0.8
    c = r.word_counts
    assert c.hits + c.substitutions + c.deletions == 6
    assert math.isclose(r.wer, (c.substitutions + c.deletions + c.insertions) / 6)


def test_insertions_push_wer_past_one_and_empty_hypothesis_is_all_deletions() -> None:
    assert error_rates("a b c d e f", "a").wer == 5.0
    empty = error_rates("", "red green blue")
    assert empty.wer == 1.0 and empty.word_counts.deletions == 3


def test_empty_reference_is_an_error_not_a_score() -> None:
    with pytest.raises(EmptyReference):
        error_rates("hello", "?!")


def test_chinese_is_scored_per_character() -> None:
    r = error_rates("你好世界", "你好，世间", language="zh")
    assert r.normalized_reference == "你 好 世 间"
    assert math.isclose(r.wer, 0.25)
    assert math.isclose(r.cer, 0.25)


def test_wer_mappings() -> None:
    assert wer_reward(0.0) == 1.0 and wer_reward(2.0) == 0.0
    assert math.isclose(wer_reward(0.2, "one_minus_tanh_3wer"), 1 - math.tanh(0.6))
    assert math.isclose(wer_reward(5.0, "one_minus_tanh_3wer"), 0.0, abs_tol=1e-9)
    assert wer_reward(1.5, "negative_wer") == -1.5
    with pytest.raises(ValueError, match="one_minus_wer"):
        wer_reward(0.1, "nope")


def test_a_negative_floor_lets_r1_rank_what_the_clip_ties() -> None:
    assert [wer_reward(w, floor=-1.0) for w in (0.25, 1.0, 1.5, 2.0, 5.0)] == [0.75, 0.0, -0.5, -1.0, -1.0]
    assert wer_reward(1.5) == wer_reward(3.0) == 0.0  # the paper's clip: a long loop scores as a plain miss
    assert wer_reward(0.9, "one_minus_tanh_3wer", floor=-1.0) > 0.0  # 1 - tanh never reaches below 0
    with pytest.raises(ValueError, match="floor must be <= 0"):
        wer_reward(0.5, floor=0.5)


def test_rule_rewards_take_the_r1_mapping_and_floor() -> None:
    looped = "turn on the light " * 3  # 12 words against 4: WER 2
    clipped = rule_rewards(looped, "turn on the light")
    floored = rule_rewards(looped, "turn on the light", config=RuleRewardConfig(accuracy_floor=-1.0))
    assert (clipped.wer, clipped.accuracy_reward, floored.accuracy_reward) == (2.0, 0.0, -1.0)
    assert floored.total == -2.0 and floored.hallucination_reasons == clipped.hallucination_reasons
    tanh = rule_rewards("turn on the lights", "turn on the light", config=RuleRewardConfig(accuracy_mapping="one_minus_tanh_3wer"))
    assert tanh.accuracy_reward == pytest.approx(1 - math.tanh(0.75))
    for bad, message in (({"accuracy_floor": 0.5}, "accuracy_floor"), ({"accuracy_mapping": "nope"}, "accuracy_mapping")):
        with pytest.raises(ValueError, match=message):
            RuleRewardConfig(**bad)


def test_similarity_mappings() -> None:
    assert similarity_reward(-0.5) == -0.5
    assert similarity_reward(-0.5, "shifted") == 0.25
    assert similarity_reward(-0.5, "clipped") == 0.0


def test_r1_is_one_minus_wer_clipped() -> None:
    r = rule_rewards("turn on the kitchen light", "turn on the kitchen lights")
    assert math.isclose(r.accuracy_reward, 0.8)
    assert rule_rewards("a b c d e f g h", "x").accuracy_reward == 0.0


def test_r2_fires_on_a_looping_repeat() -> None:
    hyp = "the weather today is nice is nice is nice is nice is nice"
    r = rule_rewards(hyp, "the weather today is nice")
    assert r.hallucination_reward == -1.0
    assert "repeated_ngram" in r.hallucination_reasons


def test_r2_fires_on_a_repeated_sentence() -> None:
    ref = "the bottle near the farm was opened by sam and the cat slept on the mat"
    hyp = "the bottle near the farm was opened by sam the bottle near the farm was opened by sam"
    r = rule_rewards(hyp, ref)
    assert "repeated_ngram" in r.hallucination_reasons and r.hallucination_reward == -1.0


def test_r2_fires_on_a_sentence_repeated_later() -> None:
    ref = "the bottle near the farm was opened by sam and the red cup was sold on monday"
    hyp = "the bottle near the farm was opened by sam and the bottle near the farm was opened"
    assert "repeated_ngram" in rule_rewards(hyp, ref).hallucination_reasons


def test_r2_allows_repeats_the_reference_has() -> None:
    ref = "no no no no never"
    assert rule_rewards(ref, ref).hallucination_reward == 0.0


def test_r2_fires_on_invented_content() -> None:
    r = rule_rewards("please call me back thanks for watching and please subscribe to the channel",
                     "please call me back")
    assert r.hallucination_reward == -1.0
    assert {"insertion_burst", "too_long"} <= set(r.hallucination_reasons)


def test_r2_fires_on_a_translation() -> None:
    r = rule_rewards("hello everyone welcome to the meeting", "大家好欢迎参加会议", language="zh")
    assert "script_mismatch" in r.hallucination_reasons


def test_r2_is_quiet_on_an_ordinary_error() -> None:
    r = rule_rewards("the cat sat on a mat", "the cat sat on the mat")
    assert r.hallucination_reward == 0.0 and r.hallucination_reasons == []


def test_r3_keyword_precision_and_recall() -> None:
    keywords = ["kubernetes", "redis", "grafana"]
    ref = "deploy redis on kubernetes"
    full = rule_rewards("deploy redis on kubernetes", ref, keywords)
    assert (full.keyword_precision, full.keyword_recall, full.keyword_reward) == (1.0, 1.0, 1.0)
    missed = rule_rewards("deploy radish on kubernetes", ref, keywords)
    assert missed.keyword_recall == 0.5 and missed.keyword_precision == 1.0
    wrong = rule_rewards("deploy grafana on kubernetes", ref, keywords)
    assert wrong.keyword_precision == 0.5 and wrong.keyword_recall == 0.5
    assert wrong.keyword_reward == 0.5


def test_total_is_the_weighted_sum_of_components() -> None:
    config = RuleRewardConfig(accuracy_weight=0.5, hallucination_weight=2.0, keyword_weight=1.0)
    r = rule_rewards("hi hi hi hi hi hi", "hi there", ["there"], config=config)
    expected = 0.5 * r.accuracy_reward + 2.0 * r.hallucination_reward + 1.0 * r.keyword_reward
    assert math.isclose(r.total, expected)
    assert r.hallucination_reward == -1.0


def test_helpers() -> None:
    assert looped_words("a b a b a b a b".split(), RuleRewardConfig()) == 6
    assert looped_words("a b a b".split(), RuleRewardConfig()) == 0, "a short n-gram twice is not a loop"
    assert dominant_script("hello") == "LATIN"
    assert dominant_script("こんにちは世界") == "CJK"
    assert dominant_script("hi") is None
    assert dominant_script("a1 b2 !") is None, "digits and symbols are not letters"
    assert dominant_script("Привет, мир") == "CYRILLIC"
    assert normalize_text("") == ""


def test_config_checks_its_invariants() -> None:
    with pytest.raises(ValueError, match="repeat_threshold"):
        RuleRewardConfig(repeat_threshold=1)

"""The pinyin error unit: CosyVoice2's GRPO recipe's Mandarin metric, on cases worked out by hand.

The recipe (CosyVoice examples/grpo/cosyvoice2/token2wav_asr_server.py, March 2026) computes
`1 - tanh(3 * wer)` clipped to [0, 1], where wer is jiwer's WER between the tone-numbered pinyin of
the two texts after WeTextProcessing's Chinese normalisation.
"""

from __future__ import annotations

import math

import pytest

from speechrl.rewards import wer_reward
from speechrl.rewards.pinyin import pinyin_error_rate, to_pinyin
from speechrl.rewards.wer import EmptyReference, error_rates

REFERENCE = "他去了北京。"  # ta1 qu4 le5 bei3 jing1: five syllables


def test_homophones_cost_nothing_where_characters_would() -> None:
    rate = pinyin_error_rate("她去了北京", REFERENCE)  # 她 and 他 are both ta1
    assert rate.wer == 0.0 and rate.reference_pinyin == "ta1 qu4 le5 bei3 jing1"
    assert error_rates("她去了北京", REFERENCE, "zh").wer == pytest.approx(1 / 5)  # one character of five


def test_a_wrong_tone_costs_its_syllable() -> None:
    rate = pinyin_error_rate("他去了背景", REFERENCE)  # bei4 jing3 for bei3 jing1: 2 of 5 substituted
    assert rate.hypothesis_pinyin == "ta1 qu4 le5 bei4 jing3"
    assert rate.wer == pytest.approx(2 / 5)
    assert wer_reward(rate.wer, "one_minus_tanh_3wer") == pytest.approx(1 - math.tanh(1.2))


def test_numbers_are_spelled_and_punctuation_dropped_before_comparing() -> None:
    assert to_pinyin("我有2个苹果！") == "wo3 you3 liang3 ge4 ping2 guo3"  # 2个 is read 两个
    assert pinyin_error_rate("我有两个苹果", "我有2个苹果！").wer == 0.0


def test_tone_sandhi_and_the_neutral_tone_are_the_recipes() -> None:
    assert to_pinyin("你好") == "ni2 hao3"  # third tone before a third tone reads as second
    assert to_pinyin("桌子") == "zhuo1 zi5"  # neutral tone written as 5


def test_an_empty_hypothesis_is_all_deletions_and_an_empty_reference_is_refused() -> None:
    assert pinyin_error_rate("", REFERENCE).wer == 1.0
    with pytest.raises(EmptyReference, match="no pinyin syllables"):
        pinyin_error_rate("他", "。！")


# What the recipe's own lines (WeTextProcessing 1.2.0's ZhNormalizer with the recipe's options, built with
# pynini 2.1.7, then lazy_pinyin as the recipe calls it) wrote for these texts, run once on 2026-12-07.
RECIPE_PINYIN = {
    "他去了北京。": "ta1 qu4 le5 bei3 jing1",
    "我有2个苹果！": "wo3 you3 liang3 ge4 ping2 guo3",
    "今天是2024年3月5日，气温25℃。": "jin1 tian1 shi4 er4 ling2 er4 si4 nian2 san1 yue4 wu3 ri4 qi4 wen1 er4 shi2 wu3 she4 shi4 du4",
    "你好，世界": "ni2 hao3 shi4 jie4",
    "一会儿见": "yi1 hui4 er5 jian4",
    "桌子上有3.5公斤的东西": "zhuo1 zi5 shang4 you3 san1 dian3 wu3 gong1 jin1 de5 dong1 xi1",
    "Hello世界，OK吗？": "hello shi4 jie4 ok ma5",
    "电话号码是13812345678": "dian4 hua4 hao4 ma3 shi4 yao1 san1 ba1 yao1 er4 san1 si4 wu3 liu4 qi1 ba1",
    "他说：\"好的。\"": "ta1 shuo1 hao3 de5",
    "百分之五十和50%": "bai3 fen1 zhi1 wu3 shi2 he2 bai3 fen1 zhi1 wu3 shi2",
}


@pytest.mark.parametrize("text", list(RECIPE_PINYIN))
def test_the_pinyin_is_the_recipes(text: str) -> None:
    assert to_pinyin(text) == RECIPE_PINYIN[text]

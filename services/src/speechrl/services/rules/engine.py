"""Rule-reward engine: scores batches of hypotheses with speechrl.rewards, one result per item."""

from __future__ import annotations

from dataclasses import dataclass, replace

from speechrl.rewards import RuleRewardConfig, RuleRewardResult, rule_rewards
from speechrl.rewards.wer import EmptyReference
from speechrl.services.errors import ErrorCode, ItemFailure


@dataclass(frozen=True)
class RuleItem:
    """One hypothesis to score, with the weights of its request."""

    hypothesis: str
    reference: str
    keywords: tuple[str, ...] = ()
    language: str = "en"
    config: RuleRewardConfig = RuleRewardConfig()


class RuleRewardEngine:
    """Scores hypotheses; text longer than max_text_chars is refused per item."""

    def __init__(self, max_text_chars: int = 20_000):
        self.max_text_chars = max_text_chars

    def score_batch(self, items: list[RuleItem]) -> list[RuleRewardResult | ItemFailure]:
        """Score every item; a bad item gets an ItemFailure and the others are unaffected.

        Identical items (a group's repeated samples) are scored once; each text's normalisation is
        remembered process wide (speechrl.rewards.text), so a group's reference is normalised once.
        """
        scored: dict[RuleItem, RuleRewardResult | ItemFailure] = {}
        for item in items:
            if item not in scored:
                scored[item] = self._score(item)
        return [scored[item] for item in items]

    def _score(self, item: RuleItem) -> RuleRewardResult | ItemFailure:
        for name, text in (("hypothesis", item.hypothesis), ("reference", item.reference)):
            if len(text) > self.max_text_chars:
                return ItemFailure(ErrorCode.TEXT_TOO_LONG, f"{name} has {len(text)} characters, over the server's max_text_chars of {self.max_text_chars}", name)
        if not item.reference.strip():
            return ItemFailure(ErrorCode.EMPTY_TEXT, "reference is empty", "reference")
        try:
            return rule_rewards(item.hypothesis, item.reference, item.keywords, item.language or "en", item.config)
        except EmptyReference as exc:
            return ItemFailure(ErrorCode.EMPTY_TEXT, str(exc), "reference")


def weighted_config(accuracy: float | None, hallucination: float | None, keyword: float | None,
                    accuracy_mapping: str | None = None, accuracy_floor: float | None = None) -> RuleRewardConfig:
    """The default config with the weights, R1 mapping and R1 floor a request set (None: the default)."""
    base = RuleRewardConfig()
    return replace(base,
                   accuracy_weight=base.accuracy_weight if accuracy is None else accuracy,
                   hallucination_weight=base.hallucination_weight if hallucination is None else hallucination,
                   keyword_weight=base.keyword_weight if keyword is None else keyword,
                   accuracy_mapping=accuracy_mapping or base.accuracy_mapping,
                   accuracy_floor=base.accuracy_floor if accuracy_floor is None else accuracy_floor)

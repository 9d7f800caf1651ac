"""JSON models of /v1/openrlhf: OpenRLHF's remote reward-model protocol, and how its fields map to ours.

OpenRLHF (`--reward.remote_url`) POSTs `{"query": [...], "prompts": [...], "labels": [...]}` and reads
`rewards`, `scores` and `extra_logs` from the reply; its single-turn agent sends one sample per
request (lists of one), each query being the whole decoded sequence, prompt + response, with special
tokens kept (openrlhf/utils/agent.py). So:

- completion = the query after its prompt (`completion_of`), special tokens removed for text;
- label = the reference text, or a dict (or its JSON) {"reference", "keywords", "language"}.

Those three live in speechrl.adapters.openrlhf, shared with OpenRLHF's reward_func file mode.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from speechrl.adapters.openrlhf import completion_of, label_fields, text_of
from speechrl.services.gateway.scoring import ItemScores

__all__ = ["OpenRLHFRewardBody", "OpenRLHFRewardReply", "completion_of", "label_fields", "text_of"]

class OpenRLHFRewardBody(BaseModel):
    """What OpenRLHF's remote reward client sends: one entry per sample in each list."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "query": ["<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\nturn on the light<|im_end|>"],
        "prompts": ["<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"],
        "labels": ["turn on the lights"]}]})

    query: list[str] = Field(min_length=1, description="Prompt + response of each sample, decoded with special tokens.")
    prompts: list[str] | None = Field(default=None, description="The prompt of each sample; cut from the query.")
    # Required: every scorer compares with a reference, and a missing one would score every sample as
    # adapter_failure_reward with status 200, which an RL run reads as real rewards.
    labels: list[Any] = Field(description="Required. Reference text per sample, or a dict "
                                          '{"reference", "keywords", "language"} (or its JSON).')

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRewardBody:
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.query)} queries; give one per query")
        return self

    def completions(self) -> list[str]:
        prompts: list[str | None] = list(self.prompts) if self.prompts else [None] * len(self.query)
        return [completion_of(q, p) for q, p in zip(self.query, prompts, strict=True)]

    def label_fields(self) -> list[tuple[str | None, list[str], str]]:
        return [label_fields(label) for label in self.labels]


class OpenRLHFRewardReply(BaseModel):
    """What OpenRLHF reads back: `rewards` for training, `scores` for filtering, `extra_logs` as metrics."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "rewards": [0.75], "scores": [0.75],
        "extra_logs": {"scored": [1.0], "wer": [0.25], "accuracy": [0.75], "hallucination": [0.0], "keyword": [1.0]}}]})

    rewards: list[float] = Field(description="One reward per query; adapter_failure_reward where not scored.")
    scores: list[float] = Field(description="The same numbers (OpenRLHF's dynamic filtering reads scores).")
    extra_logs: dict[str, list[float]] = Field(
        description="Per-sample numbers OpenRLHF logs as metrics: scored (1/0) and the reward's components "
                    "(0 where not scored).")

    @classmethod
    def of(cls, scores: ItemScores) -> OpenRLHFRewardReply:
        logs = {"scored": [1.0 if s else 0.0 for s in scores.scored], **scores.components}
        return cls(rewards=scores.rewards, scores=scores.rewards, extra_logs=logs)

"""OpenRLHF: its reward_func file mode, and how its samples map to ours (shared with the gateway's route).

OpenRLHF's single-turn agent (openrlhf/utils/agent.py, August 2026) takes `--reward.remote_url` to be
a Python file when it ends in ".py": it loads the file's `reward_func(queries, prompts, labels)` and
calls it in a worker thread, one sample per call, where each query is the whole decoded sequence
(prompt + response, special tokens kept). Point it at this file to reach the scorers over gRPC,
without the gateway's HTTP hop (that file, openrlhf_reward_func.py, only re-exports reward_func):

    --reward.remote_url $(python -c "import speechrl.adapters.openrlhf_reward_func as m; print(m.__file__)")

OpenRLHF passes nothing else, so the settings are environment variables, SPEECHRL_OPENRLHF_<FIELD>
(`OpenRLHFRewardSettings`), e.g. SPEECHRL_OPENRLHF_RULES=10.0.0.5:50053. The reply is the gateway
route's: {"rewards", "scores", "extra_logs": {"scored", components...}}, `failure_reward` where a
sample could not be scored (OpenRLHF needs a number).

>>> completion_of("<|im_start|>user\\nsay hi<|im_end|>\\n<|im_start|>assistant\\nhello there<|im_end|>",
...               "<|im_start|>user\\nsay hi<|im_end|>\\n<|im_start|>assistant\\n")
'hello there<|im_end|>'
>>> text_of('hello there<|im_end|><|endoftext|>')
'hello there'
>>> label_fields('{"reference": "turn it on", "keywords": ["on"]}')
('turn it on', ['on'], '')
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from speechrl.adapters.inputs import parse_speech_tokens
from speechrl.adapters.scoring import CallPolicy, IntelligibilityScorer, Outcome, RulesScorer, RuleWeights, run_sync
from speechrl.adapters.token2wav import speech_from_tokens, token2wav_service
from speechrl.client import AsyncToken2WavClient

ENV_PREFIX = "SPEECHRL_OPENRLHF_"
RULE_COMPONENTS = ("wer", "accuracy", "hallucination", "keyword")
SPEECH_COMPONENTS = ("wer", "cer", "error_rate")

# Markers of special tokens that a decode with skip_special_tokens=False leaves in the text
# (<|im_end|>, <|endoftext|>, </s>, ...); speech tokens <|s_N|> are read before this is applied.
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]*\|>|</?s>|<(?:eos|pad|bos|unk)>")


def completion_of(query: str, prompt: str | None) -> str:
    """The response part of an OpenRLHF query (prompt + response as one decoded string).

    The prompt is cut where the query starts with it, else after its first occurrence, else after
    the longest common prefix (a tokenizer round trip may change a few characters of the prompt).
    """
    if not prompt:
        return query
    if query.startswith(prompt):
        return query[len(prompt):]
    found = query.find(prompt)
    if found >= 0:
        return query[found + len(prompt):]
    return query[len(os.path.commonprefix([query, prompt])):]


def text_of(completion: str) -> str:
    """A completion as text: special-token markers removed, outer whitespace stripped."""
    return SPECIAL_TOKEN.sub("", completion).strip()


def label_fields(label: Any) -> tuple[str | None, list[str], str]:
    """(reference text, keywords, language) of a label: a string, a dict, or the dict as JSON."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except ValueError:
            pass  # a reference that happens to start with "{"
    if isinstance(label, Mapping):
        reference = next((label[k] for k in ("reference", "text", "ground_truth", "label") if label.get(k) is not None), None)
        keywords = label.get("keywords") or []
        return (None if reference is None else str(reference),
                [keywords] if isinstance(keywords, str) else [str(k) for k in keywords], str(label.get("language") or ""))
    return (None if label is None else str(label)), [], ""


@dataclasses.dataclass(frozen=True)
class OpenRLHFRewardSettings:
    """What reward_func scores with; each field is read from SPEECHRL_OPENRLHF_<FIELD> (upper case)."""

    scorer: str = "rules"
    """rules (ASR: the response text against the label) or token2wav_asr (TTS: speech tokens <|s_N|>)."""
    rules: str = ""
    """Rule-reward service endpoints; empty: the SDK's default (127.0.0.1:50053)."""
    intelligibility: str = ""
    """Intelligibility scorer endpoints (token2wav_asr); empty: the SDK's default (127.0.0.1:50051)."""
    token2wav: str = ""
    """Token2wav service endpoints (token2wav_asr); empty: the SDK's default (127.0.0.1:50056)."""
    accuracy_weight: float | None = None
    hallucination_weight: float | None = None
    keyword_weight: float | None = None
    reward_mapping: str = "one_minus_tanh_3wer"
    """token2wav_asr: WER -> reward."""
    error_unit: str | None = None
    """token2wav_asr: word (None), character or pinyin."""
    language: str = ""
    """ISO 639-1 code for labels that give none."""
    failure_reward: float = 0.0
    """Reward of a sample that could not be scored."""
    timeout_s: float = 30.0
    """Deadline of one scorer call, retries included."""

    def __post_init__(self) -> None:
        if self.scorer not in ("rules", "token2wav_asr"):
            raise ValueError(f"{ENV_PREFIX}SCORER must be rules or token2wav_asr, got {self.scorer!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OpenRLHFRewardSettings:
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            numeric = field.name.endswith(("_weight", "_reward", "_s"))
            try:
                values[field.name] = float(raw) if numeric else raw
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be a number, got {raw!r}") from None
        return cls(**values)


@functools.cache
def _scorers(settings: OpenRLHFRewardSettings) -> tuple[RulesScorer, IntelligibilityScorer, Any]:
    """The scorers of a setting, made once: their channels are reused by every call."""
    policy = CallPolicy(timeout_s=settings.timeout_s, failure_reward=settings.failure_reward)
    weights = RuleWeights(settings.accuracy_weight, settings.hallucination_weight, settings.keyword_weight)
    rules = RulesScorer(settings.rules or None, weights=weights, policy=policy)
    intelligibility = IntelligibilityScorer(settings.intelligibility or None, reward_mapping=settings.reward_mapping,
                                            error_unit=settings.error_unit, policy=policy)
    vocoder = AsyncToken2WavClient(settings.token2wav or None, timeout_s=settings.timeout_s)
    return rules, intelligibility, token2wav_service(vocoder)


async def score_queries(queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any],
                        settings: OpenRLHFRewardSettings) -> dict[str, Any]:
    """reward_func's answer, awaited."""
    if len(labels) != len(queries) or (prompts is not None and len(prompts) != len(queries)):
        raise ValueError(f"need one prompt and one label per query: {len(queries)} queries, "
                         f"{None if prompts is None else len(prompts)} prompts, {len(labels)} labels")
    cut_prompts: Sequence[str | None] = prompts if prompts is not None else [None] * len(queries)
    completions = [completion_of(q, p) for q, p in zip(queries, cut_prompts, strict=True)]
    fields = [label_fields(label) for label in labels]
    references = [reference for reference, _, _ in fields]
    languages = [language or settings.language for _, _, language in fields]
    rules, intelligibility, token2wav = _scorers(settings)
    outcomes: list[Outcome]
    if settings.scorer == "rules":
        outcomes = await rules.score([text_of(c) for c in completions], references,
                                     keywords=[keywords for _, keywords, _ in fields], languages=languages)
    else:
        audios, errors = await speech_from_tokens(token2wav, [parse_speech_tokens(c) for c in completions],
                                                  "speechrl.adapters.openrlhf")
        outcomes = await intelligibility.score(audios, references, languages=languages, local_errors=errors)
    rewards = [settings.failure_reward if o.reward is None else float(o.reward) for o in outcomes]
    names = RULE_COMPONENTS if settings.scorer == "rules" else SPEECH_COMPONENTS
    logs = {"scored": [0.0 if o.reward is None else 1.0 for o in outcomes],
            **{name: [float(o.components.get(name, 0.0)) for o in outcomes] for name in names}}
    return {"rewards": rewards, "scores": rewards, "extra_logs": logs}


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's reward function: {"rewards", "scores", "extra_logs"} for its queries, blocking."""
    return run_sync(score_queries(queries, prompts, labels, OpenRLHFRewardSettings.from_env()))

"""SpeechRL rewards inside other trainers, with only speechrl-client installed (no torch import).

- `speechrl.adapters.trl`: reward functions for TRL's GRPOTrainer (`RuleReward`,
  `IntelligibilityReward`, `SpeakerSimilarityReward`, and `Async*` variants).
- `speechrl.adapters.verl`: `compute_score`, `compute_score_batch` and `compute_score_async` in the
  shapes verl's reward managers call.
- OpenRLHF and Triton / KServe v2 clients need no adapter: the gateway speaks their protocols
  (`POST /v1/openrlhf/{scorer}`, `POST /v2/models/{name}/infer`).

Shared parts (the call policy, the loop-bound scorers, speech-token parsing, token2wav) are in
`speechrl.adapters.common`; docs/integrations/ has one page per framework.

>>> from speechrl.adapters import CallPolicy, parse_speech_tokens
>>> CallPolicy().failure_reward is None, parse_speech_tokens("<|s_3|><|s_9|>")
(True, [3, 9])
"""

from speechrl.adapters.common import (
    CallPolicy,
    IntelligibilityScorer,
    Outcome,
    RulesScorer,
    RuleWeights,
    SpeakerScorer,
    Token2Wav,
    Token2WavNotConfigured,
    parse_speech_tokens,
)

__all__ = [
    "CallPolicy", "IntelligibilityScorer", "Outcome", "RuleWeights", "RulesScorer", "SpeakerScorer", "Token2Wav",
    "Token2WavNotConfigured", "parse_speech_tokens",
]

"""SpeechRL rewards inside other trainers, with only speechrl-client installed (no torch import).

- `speechrl.adapters.trl`: reward functions for TRL's GRPOTrainer (`RuleReward`,
  `IntelligibilityReward`, `SpeakerSimilarityReward`, and `Async*` variants).
- `speechrl.adapters.verl`: `compute_score`, `compute_score_batch` and `compute_score_async` in the
  shapes verl's reward managers call.
- OpenRLHF and Triton / KServe v2 clients need no adapter: the gateway speaks their protocols
  (`POST /v1/openrlhf/{scorer}`, `POST /v2/models/{name}/infer`).

Shared parts: the call policy and the loop-bound scorers in `speechrl.adapters.scoring`, a trainer's
values (completions, speech tokens, dataset cells) in `speechrl.adapters.inputs`, the token2wav step in
`speechrl.adapters.token2wav`; docs/integrations/ has one page per framework.

>>> from speechrl.adapters import CallPolicy, parse_speech_tokens
>>> CallPolicy().failure_reward is None, parse_speech_tokens("<|s_3|><|s_9|>")
(True, [3, 9])
"""

from speechrl.adapters.inputs import parse_speech_tokens
from speechrl.adapters.scoring import (
    CallPolicy,
    IntelligibilityScorer,
    Outcome,
    RulesScorer,
    RuleWeights,
    SpeakerScorer,
)
from speechrl.adapters.token2wav import Token2Wav, Token2WavNotConfigured

__all__ = [
    "CallPolicy", "IntelligibilityScorer", "Outcome", "RuleWeights", "RulesScorer", "SpeakerScorer", "Token2Wav",
    "Token2WavNotConfigured", "parse_speech_tokens",
]

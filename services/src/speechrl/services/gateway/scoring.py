"""Scoring behind the trainer-protocol routes (OpenRLHF, KServe v2): per-item outcomes with one policy.

The routes give plain lists (hypotheses, audios, speech tokens); this module calls the gateway's
shared SDK clients through the adapters' scorers (`speechrl.adapters.scoring`), so that the local
checks, the per-item errors and the failure policy are the same as in the TRL and verl adapters:

- an item that cannot be scored gets `adapter_failure_reward` (0.0), `scored = False` and its reason;
- a scorer call that fails as a whole does the same for its items and is logged, or, with
  `adapter_scorer_errors = "http"`, raises ServiceError so the reply is 429 / 503 / 504;
- speech tokens need the app's token2wav hook (`app.state.token2wav`, a `Token2Wav` callable): the
  gateway attaches one that calls the token2wav service when `token2wav` has endpoints
  (`speechrl.adapters.token2wav.token2wav_service`); without either the reply is 503 "token2wav backend not configured".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import State

from speechrl.adapters.inputs import SpeakerReferenceLike
from speechrl.adapters.scoring import (
    CallPolicy,
    IntelligibilityScorer,
    Outcome,
    RulesScorer,
    RuleWeights,
    SpeakerScorer,
    log_failures,
)
from speechrl.adapters.token2wav import Token2Wav, speech_from_tokens
from speechrl.client import AudioLike, ServiceError
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.deps import Scorers
from speechrl.services.gateway.errors import ScorerOff

log = logging.getLogger(__name__)


def token2wav_of(state: State) -> Token2Wav | None:
    """The app's speech-token -> audio callable; None until one is attached (`app.state.token2wav = fn`)."""
    return getattr(state, "token2wav", None)


def policy_of(config: GatewayConfig) -> CallPolicy:
    # Deadline and retries are the gateway clients' own (request_timeout_s, max_attempts).
    return CallPolicy(failure_reward=config.adapter_failure_reward,
                      raise_on_service_error=config.adapter_scorer_errors == "http")


@dataclass
class ItemScores:
    """Per-item rewards of one request, the failure policy applied, plus named components."""

    rewards: list[float]
    scored: list[bool]
    errors: list[str]
    """Why an item was not scored; "" for scored items."""
    components: dict[str, list[float]] = field(default_factory=dict)
    """Named parts per item (0.0 where not scored), e.g. {"wer": [...]}."""
    texts: dict[str, list[str]] = field(default_factory=dict)
    """Text by-products per item ("" where not scored), e.g. {"transcript": [...]}."""

    @classmethod
    def of(cls, outcomes: Sequence[Outcome], failure_reward: float, components: Sequence[str] = (),
           texts: Sequence[str] = ()) -> ItemScores:
        return cls(rewards=[failure_reward if o.reward is None else float(o.reward) for o in outcomes],
                   scored=[o.reward is not None for o in outcomes], errors=[o.error or "" for o in outcomes],
                   components={k: [float(o.components.get(k, 0.0)) for o in outcomes] for k in components},
                   texts={k: [o.texts.get(k, "") for o in outcomes] for k in texts})


def _needed(client: Any, name: str) -> Any:
    if client is None:
        raise ScorerOff(name)
    return client


async def rules(scorers: Scorers, config: GatewayConfig, hypotheses: Sequence[str], references: Sequence[str | None],
                *, keywords: Sequence[Sequence[str]] | None = None, languages: Sequence[str] | None = None,
                weights: RuleWeights = RuleWeights()) -> list[Outcome]:
    """The rule rewards of text hypotheses (components wer, accuracy, hallucination, keyword)."""
    scorer = RulesScorer(weights=weights, policy=policy_of(config), client=_needed(scorers.rules, "rules"))
    outcomes = await scorer.score(hypotheses, references, keywords=keywords, languages=languages)
    log_failures("gateway rules", outcomes)
    return outcomes


async def intelligibility(scorers: Scorers, config: GatewayConfig, audios: Sequence[AudioLike | None],
                          references: Sequence[str | None], *, languages: Sequence[str] | None = None,
                          reward_mapping: str | None = None, error_unit: str | None = None,
                          local_errors: dict[int, str] | None = None) -> list[Outcome]:
    """The intelligibility reward of audios (components wer, cer, error_rate; text transcript)."""
    scorer = IntelligibilityScorer(reward_mapping=reward_mapping, error_unit=error_unit, policy=policy_of(config),
                                   client=_needed(scorers.intelligibility, "intelligibility"))
    outcomes = await scorer.score(audios, references, languages=languages, local_errors=local_errors)
    log_failures("gateway intelligibility", outcomes)
    return outcomes


async def speaker(scorers: Scorers, config: GatewayConfig, audios: Sequence[AudioLike | None],
                  references: Sequence[SpeakerReferenceLike | None], *, reward_mapping: str | None = None,
                  local_errors: dict[int, str] | None = None) -> list[Outcome]:
    """The speaker-similarity reward of audios against reference voices (component cosine)."""
    scorer = SpeakerScorer(reward_mapping=reward_mapping, policy=policy_of(config),
                           client=_needed(scorers.speaker, "speaker"))
    outcomes = await scorer.score(audios, references, local_errors=local_errors)
    log_failures("gateway speaker", outcomes)
    return outcomes


async def speech_tokens(state: State, scorers: Scorers, config: GatewayConfig, token_lists: Sequence[Sequence[int]],
                        references: Sequence[str | None], *, languages: Sequence[str] | None = None,
                        reward_mapping: str | None = "one_minus_tanh_3wer",
                        error_unit: str | None = None) -> list[Outcome]:
    """Speech tokens -> audio (the token2wav hook) -> intelligibility, as CosyVoice's token2wav_asr model does.

    Raises Token2WavNotConfigured (503) when there are tokens and no token2wav hook.
    """
    _needed(scorers.intelligibility, "intelligibility")
    # A token2wav outage follows the scorers' failure policy: failure rewards, or 429/503/504 with "http".
    reraise = (ServiceError,) if config.adapter_scorer_errors == "http" else ()
    audios, errors = await speech_from_tokens(token2wav_of(state), token_lists, "the gateway", reraise=reraise)
    return await intelligibility(scorers, config, audios, references, languages=languages,
                                 reward_mapping=reward_mapping, error_unit=error_unit, local_errors=errors)

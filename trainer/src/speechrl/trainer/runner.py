"""Job kinds and how to run one: the CLI (`speechrl train`) and the job service share this.

A job file is YAML or JSON: `kind` (default "asr-grpo") plus that kind's config fields, e.g.

    kind: asr-grpo
    policy: runs/warmstart/policy
    data: runs/data/manifest.jsonl
    steps: 20
    grpo: {group_size: 8, batch_size: 8, learning_rate: 1.0e-5, kl_beta: 0.1}
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from speechrl.trainer import asr_job, tts_job
from speechrl.trainer.jobkit import Progress


@dataclass(frozen=True)
class JobKind:
    """A kind of training job: its config dataclass and its async run function."""

    config_class: type
    run: Callable[[Any, Progress], Coroutine[Any, Any, dict[str, Any]]]


KINDS: dict[str, JobKind] = {
    "asr-grpo": JobKind(asr_job.AsrJobConfig, asr_job.run),
    **{kind: JobKind(tts_job.TtsJobConfig, tts_job.runner(kind)) for kind in tts_job.KIND_LOSSES},
}


class JobConfigError(ValueError):
    """A job file that names an unknown kind or field, or breaks a config invariant."""


def parse_job(values: Mapping[str, Any]) -> tuple[str, Any]:
    """(kind, config) from a job mapping; JobConfigError names what is wrong."""
    values = dict(values)
    kind = values.pop("kind", "asr-grpo")
    if kind not in KINDS:
        raise JobConfigError(f"kind: unknown job kind {kind!r}; known: {', '.join(KINDS)}")
    config_class = KINDS[kind].config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise JobConfigError(f"{', '.join(unknown)}: not a field of {kind} jobs; fields are {', '.join(sorted(known))}")
    try:
        config = config_class(**values)
        if hasattr(config, "grpo_config"):
            config.grpo_config  # noqa: B018 - validates the nested GRPOConfig now, not at step 1
    except (TypeError, ValueError) as exc:
        raise JobConfigError(str(exc)) from None
    return kind, config


def load_job_file(path: str | Path) -> tuple[str, Any]:
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise JobConfigError(f"{path}: a job file is a mapping of fields, got {type(values).__name__}")
    return parse_job(values)


def run_job(kind: str, config: Any, progress: Progress) -> dict[str, Any]:
    """Run a job to completion in this thread (its own event loop)."""
    return asyncio.run(KINDS[kind].run(config, progress))

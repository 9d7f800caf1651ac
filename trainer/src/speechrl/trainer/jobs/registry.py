"""Job kinds by name, and how to read and run a job: `speechrl train` and the job service share this.

A job file is YAML or JSON: `kind` (default "asr-grpo") plus that kind's config fields, e.g.

    kind: asr-grpo
    policy: runs/warmstart/policy
    data: runs/data/manifest.jsonl
    steps: 20
    grpo: {group_size: 8, batch_size: 8, learning_rate: 1.0e-5, kl_beta: 0.1}

Adding a kind: a module with its config, policy family and session (kind.py), and one entry here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from speechrl.services.config import from_mapping
from speechrl.trainer.jobs import asr, driver, tts
from speechrl.trainer.jobs.kind import JobConfig, JobKind
from speechrl.trainer.jobs.progress import Progress

KINDS: dict[str, JobKind] = {kind.name: kind for kind in (asr.AsrGrpo(), *tts.KINDS)}


class JobConfigError(ValueError):
    """A job file that names an unknown kind or field, or breaks a config invariant."""


def parse_job(values: Mapping[str, Any]) -> tuple[str, JobConfig]:
    """(kind, config) from a job mapping; JobConfigError names what is wrong, nested keys as `grpo.kl_beta`."""
    values = dict(values)
    name = values.pop("kind", "asr-grpo")
    if name not in KINDS:
        raise JobConfigError(f"kind: unknown job kind {name!r}; known: {', '.join(KINDS)}")
    kind = KINDS[name]
    try:
        return name, from_mapping(kind.config_class, kind.job_values(values))
    except ValueError as exc:
        raise JobConfigError(str(exc)) from None


def load_job_file(path: str | Path) -> tuple[str, JobConfig]:
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise JobConfigError(f"{path}: a job file is a mapping of fields, got {type(values).__name__}")
    return parse_job(values)


def run_job(kind: str | JobKind, config: JobConfig, progress: Progress) -> dict[str, Any]:
    """Run a job to completion in this thread (its own event loop)."""
    return asyncio.run(driver.run(KINDS[kind] if isinstance(kind, str) else kind, config, progress))

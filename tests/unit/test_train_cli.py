"""`speechrl train` names a job's GPU lease as the trainer service does: --lease-prefix, by default the
service's own setting SPEECHRL_TRAINER_LEASE_PREFIX, prefixes an auto lease on a GPU; a lease_device
the job names itself and a job on the CPU are left alone. Checked on the config `run_job` receives,
through `speechrl.services.cli`, the module torchrun runs on Kubernetes (k8s/components/multinode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from speechrl.services import cli as speechrl_cli
from speechrl.trainer.jobs import cli
from speechrl.trainer.jobs.kind import JobConfig


def lease_run_job_gets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, job: dict[str, Any], *flags: str) -> str:
    """The lease_device of the config `speechrl train JOB [flags]` hands to run_job (which is not run)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"kind": "asr-grpo", "policy": "p", "data": "d", **job}))
    received: list[JobConfig] = []

    def run_job(kind: str, config: JobConfig, progress: Any) -> dict[str, Any]:
        received.append(config)
        return {}

    monkeypatch.setattr(cli, "run_job", run_job)
    speechrl_cli.main(["train", str(path), *flags])
    (config,) = received
    return config.lease_device


@pytest.mark.parametrize(("job", "flags", "lease"), [
    ({"device": "cuda:0"}, (), "node-a/cuda:0"),  # the environment's prefix
    ({"device": "cuda"}, (), "node-a/cuda"),  # under torchrun, rank r's node-a/cuda:LOCAL_RANK
    ({"device": "cuda:0"}, ("--lease-prefix", "node-b/"), "node-b/cuda:0"),  # the flag beats the environment
    ({"device": "cuda:0", "lease_device": "cuda:1"}, (), "cuda:1"),  # the job's own lease wins
    ({"device": "cuda:0", "lease_device": "none"}, (), "none"),
    ({"device": "cpu"}, (), "auto"),  # no lease on a CPU: nothing to name
])
def test_the_lease_prefix_reaches_the_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, job: dict[str, Any],
                                          flags: tuple[str, ...], lease: str) -> None:
    monkeypatch.setenv("SPEECHRL_TRAINER_LEASE_PREFIX", "node-a/")
    assert lease_run_job_gets(monkeypatch, tmp_path, job, *flags) == lease


def test_without_a_prefix_the_job_is_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPEECHRL_TRAINER_LEASE_PREFIX", raising=False)
    assert lease_run_job_gets(monkeypatch, tmp_path, {"device": "cuda:0"}) == "auto"
    assert lease_run_job_gets(monkeypatch, tmp_path, {"device": "cuda:0"}, "--lease-prefix", "") == "auto"


def test_the_cli_and_the_service_read_one_setting() -> None:
    from speechrl.services.config import from_namespace
    from speechrl.trainer.jobs.service import TrainerConfig

    env = {cli.LEASE_PREFIX_ENV: "node-a/"}
    assert from_namespace(TrainerConfig, "trainer", environ=env).lease_prefix == "node-a/"
    assert cli.parse_args(["train", "job.yaml"], env).lease_prefix == "node-a/"

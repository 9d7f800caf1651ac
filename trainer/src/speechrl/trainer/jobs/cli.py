"""`speechrl train JOB.yaml`: run a training job in the foreground with a progress bar.

The same job file can be submitted to the trainer service (POST /v1/jobs); both run the same code.
Running it again with the same out_dir resumes from the newest checkpoint. Data-parallel updates:
`torchrun --nproc-per-node 2 -m speechrl.trainer.jobs.cli train job.yaml` (rank 0 shows the bar and
writes every file).

A job on a GPU with lease_device auto takes the lease `--lease-prefix` + its device, as the trainer
service names it (its SPEECHRL_TRAINER_LEASE_PREFIX, the flag's default): on Kubernetes
`<node name>/cuda:0`, the name the node's model services give their GPU's lease, and under torchrun
each rank takes `<prefix>cuda:LOCAL_RANK`. A lease_device the job names itself is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from speechrl.services.config import env_name
from speechrl.trainer.jobs.driver import with_lease_prefix
from speechrl.trainer.jobs.registry import JobConfigError, load_job_file, run_job

# The trainer service's lease_prefix setting (jobs/service.py): one setting, one name, whichever runs the job.
LEASE_PREFIX_ENV = env_name("trainer", "lease_prefix")


class BarProgress:
    """A tqdm bar showing the headline metrics of each step."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar: Any = None
        self.tqdm = tqdm

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = self.tqdm(total=total, initial=step - 1, unit="step", dynamic_ncols=True)
        shown = {k: metrics[k] for k in ("reward_mean", "wer", "insertions", "kl", "eval/wer") if k in metrics}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        self.bar.update(1)

    def resumed(self, step: int) -> None:
        pass  # the bar starts at the first step reported

    def cancelled(self) -> bool:
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line; --lease-prefix defaults to the environment's SPEECHRL_TRAINER_LEASE_PREFIX.

    >>> env = {"SPEECHRL_TRAINER_LEASE_PREFIX": "node-7/"}
    >>> parse_args(["train", "job.yaml"], env).lease_prefix
    'node-7/'
    >>> parse_args(["train", "job.yaml", "--lease-prefix", "n/"], env).lease_prefix
    'n/'
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="speechrl train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("job", help="job file (YAML or JSON)")
    parser.add_argument("--lease-prefix", metavar="PREFIX", default=environ.get(LEASE_PREFIX_ENV, ""),
                        help=f"prefix of the lease a job on a GPU takes by default (lease_device auto): PREFIX + "
                             f"its device, e.g. node-7/cuda:0; a lease_device in the job wins. Default: "
                             f"${LEASE_PREFIX_ENV}, the trainer service's lease_prefix setting (Kubernetes: "
                             f"<node name>/), else none")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        kind, config = load_job_file(args.job)
    except (JobConfigError, OSError) as exc:
        sys.exit(f"speechrl train: {exc}")
    config = with_lease_prefix(config, args.lease_prefix)  # as the trainer service's worker does
    progress = BarProgress()
    try:
        summary = run_job(kind, config, progress)
    finally:
        progress.close()
    if summary:  # ranks > 0 of a torchrun launch have none
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

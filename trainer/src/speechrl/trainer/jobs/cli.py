"""`speechrl train JOB.yaml`: run a training job in the foreground with a progress bar.

The same job file can be submitted to the trainer service (POST /v1/jobs); both run the same code.
Running it again with the same out_dir resumes from the newest checkpoint. Data-parallel updates:
`torchrun --nproc-per-node 2 -m speechrl.trainer.jobs.cli train job.yaml` (rank 0 shows the bar and
writes every file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from speechrl.trainer.jobs.registry import JobConfigError, load_job_file, run_job


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechrl train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("job", help="job file (YAML or JSON)")
    args = parser.parse_args(argv)
    try:
        kind, config = load_job_file(args.job)
    except (JobConfigError, OSError) as exc:
        sys.exit(f"speechrl train: {exc}")
    progress = BarProgress()
    try:
        summary = run_job(kind, config, progress)
    finally:
        progress.close()
    if summary:  # ranks > 0 of a torchrun launch have none
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

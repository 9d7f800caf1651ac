"""Where a GRPO step's time goes: per-phase wall time from a run's metrics.jsonl.

    python bench/trainer_step.py [--run runs/demo/R1_R2]

The run comes from `make demo` (or any `speechrl train` job). Phases: encode (audio encoder
service), rollout (rollout service, G samples per prompt), score (rule rewards), update (GRPO on
the trainer's device, under the lease), sync (weights to the rollout service).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from sections import write_section

PHASES = ("encode", "rollout", "score", "update", "sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo/R1_R2", help="a run folder with metrics.jsonl")
    args = parser.parse_args()
    path = Path(args.run) / "metrics.jsonl"
    if not path.exists():
        sys.exit(f"{path} not found: run `make demo` first (or pass --run)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    job = json.loads((Path(args.run) / "job.json").read_text()) if (Path(args.run) / "job.json").exists() else {}
    totals = [sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in rows]
    lines = ["| phase | mean s | median s | share |", "|---|---|---|---|"]
    for phase in PHASES:
        values = [r[f"time/{phase}"] for r in rows if f"time/{phase}" in r]
        if values:
            lines.append(f"| {phase} | {statistics.mean(values):.2f} | {statistics.median(values):.2f} | "
                         f"{100 * sum(values) / sum(totals):.0f}% |")
    lines.append(f"| whole step | {statistics.mean(totals):.2f} | {statistics.median(totals):.2f} | 100% |")
    grpo = job.get("grpo", {})
    body = (f"Run `{args.run}`: {len(rows)} steps"
            + (f", {grpo.get('batch_size')} prompts x {grpo.get('group_size')} samples per step" if grpo else "")
            + ".\n\n" + "\n".join(lines))
    write_section("trainer_step", "GRPO step breakdown (bench/trainer_step.py)", body)


if __name__ == "__main__":
    main()

"""The reproductions' early stopping on dev survives a rerun over a finished job."""

from __future__ import annotations

from pathlib import Path

from speechrl.trainer.jobs.asr import AsrJobConfig
from speechrl.trainer.jobs.weights import sync_dir
from speechrl.trainer.recipes.reproduce import BEST_WEIGHTS, BestDevProgress


def test_a_rerun_over_a_finished_job_keeps_the_best_dev_step(tmp_path: Path) -> None:
    job = AsrJobConfig(policy="p", data="d", out_dir=str(tmp_path), steps=25)
    sync_dir(job).mkdir(parents=True)
    for version in (1, 2):
        (sync_dir(job) / f"policy-v{version:06d}.safetensors").write_bytes(b"step weights %d" % version)
    first = BestDevProgress("R1+R2, seed 1", job)
    first.report(15, 25, {"eval/wer": 0.80, "policy_version": 1})
    first.report(25, 25, {"eval/wer": 0.85, "policy_version": 2})
    assert first.best == (0.80, 15)
    # The rerun resumes a finished job: no step runs, so no report; the step the first run chose still
    # decides which weights are evaluated (before the fix: None, so the last step's were).
    assert BestDevProgress("R1+R2, seed 1", job).best == (0.80, 15)
    assert (tmp_path / BEST_WEIGHTS).read_bytes() == b"step weights 1"

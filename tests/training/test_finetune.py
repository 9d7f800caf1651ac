"""`speechrl finetune CHECKPOINT`: one command from a speech-LLM checkpoint folder and a manifest to a trained
checkpoint, its services started and stopped by the command itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Qwen3ASRForConditionalGeneration

from speechrl.services.speech_llm import family_of, qwen3_asr_prompt
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from speechrl.trainer.recipes.finetune import main
from tests.support.speech_llm import build_qwen3_asr


@pytest.mark.parametrize("options", [[], ["--lora", "--prompt", qwen3_asr_prompt("Chinese")]], ids=["full", "lora"])
def test_finetune_runs_grpo_on_a_checkpoint_folder(tmp_path: Path, options: list[str]) -> None:
    folder = build_qwen3_asr(tmp_path / "qwen3_asr")
    manifest = build_asr_dataset(DataConfig(out=str(tmp_path / "data"), train=4, dev=2, test=0, long_test=0),
                                 progress=False)
    out = tmp_path / "run"
    main(["finetune", str(folder), "--data", str(manifest), "--out", str(out), "--steps", "2", "--group-size", "2",
          "--batch-size", "2", "--eval-size", "2", "--learning-rate", "1e-3", *options])
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and Path(summary["plot"]).is_file()
    checkpoint = latest_checkpoint(out / "run")
    assert checkpoint is not None
    assert family_of(checkpoint / "policy") == "qwen3_asr", "the trained checkpoint is the family's own format"
    job = json.loads((out / "run" / "job.json").read_text())
    assert job["grpo"]["lora"] == bool(options) and job["asr_prompt"] == (options[2] if options else "")
    if options:  # the adapters for a resume, beside the merged checkpoint the library loads
        assert (checkpoint / "policy" / "adapter" / "adapter_config.json").is_file()
        Qwen3ASRForConditionalGeneration.from_pretrained(str(checkpoint / "policy"))


def test_finetune_refuses_a_folder_that_is_no_asr_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither a Qwen3-ASR / Qwen2-Audio checkpoint folder"):
        main(["finetune", str(tmp_path)])

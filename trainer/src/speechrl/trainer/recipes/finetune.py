"""`speechrl finetune CHECKPOINT`: a short ASR GRPO run on a checkpoint folder you already have, end to end
through the services, on a laptop or one GPU.

    speechrl finetune /models/Qwen3-ASR-0.6B --data my/manifest.jsonl --device cuda:0 --steps 50
    speechrl finetune /models/Qwen3-ASR-0.6B                 # no manifest: an espeak-ng corpus is spoken first
    speechrl finetune runs/demo/policy --rollout-backend vllm   # SpeechRL's own small LLM-ASR works too

CHECKPOINT is a transformers checkpoint folder of a supported speech-LLM family (Qwen3-ASR,
Qwen2-Audio: its save_pretrained output, e.g. a snapshot of Qwen/Qwen3-ASR-0.6B) or a policy folder
of SpeechRL's small LLM-ASR. The rule-reward, encoder and rollout services are started on private
ports (the encoder serves the checkpoint's own audio tower, the rollout service its text decoder, on
transformers or vLLM), the decoder is trained with GRPO (R1 accuracy + R2 hallucination by default)
under the device's lease, and the run folder gets metrics.jsonl, training.png, summary.json and
checkpoints that load back with the library's from_pretrained as the same family.

The manifest is SpeechRL's (jobs/datasets.py: one JSON object per line with id, audio, text, split,
duration); its `train` split gives the prompts and `dev` the greedy evaluation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from speechrl.services import stack
from speechrl.services.config import option, parse_config
from speechrl.services.speech_llm import is_speech_llm
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.jobs.asr import AsrJobConfig
from speechrl.trainer.jobs.progress import LineProgress
from speechrl.trainer.jobs.registry import run_job
from speechrl.trainer.models.asr_policy import LAYOUT_FILE
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from speechrl.trainer.recipes.reproduce import STACK, stack_environment


@dataclass
class FinetuneConfig:
    checkpoint: str = option("", "Checkpoint folder: a Qwen3-ASR / Qwen2-Audio save_pretrained folder, or a SpeechRL "
                                 "LLM-ASR policy folder.")
    data: str = option("", "Manifest whose train split gives the prompts and dev split the evaluation; empty: "
                           "speak a small English corpus with espeak-ng into <out>/data.")
    out: str = option("runs/finetune", "Run folder.")
    steps: int = option(10, "GRPO steps.")
    device: str = option("cpu", "Device of the encoder, the rollout and the update: cpu or cuda:N (one device, "
                                "taken in turns under its lease).")
    rollout_backend: str = option("transformers", "The rollout service's runtime: transformers or vllm (in "
                                                  ".venv-vllm; on a GPU the CUDA build).")
    group_size: int = option(8, "Samples per prompt (the paper: 12).")
    batch_size: int = option(4, "Prompts per step (the paper: 32).")
    learning_rate: float = option(1e-5, "Adam learning rate (the paper: 1e-5).")
    kl_beta: float = option(0.1, "KL weight against the starting checkpoint (the paper: 0.1).")
    lora: bool = option(False, "Train LoRA adapters instead of the whole decoder (checkpoints hold the adapters and "
                               "the checkpoint with them merged in).")
    prompt: str = option("", "A Qwen3-ASR / Qwen2-Audio transcription prompt with {audio} where the audio goes, "
                             "e.g. Qwen3-ASR's with another language forced; empty: the family's own.")
    eval_size: int = option(16, "dev rows evaluated greedily every 5 steps and at the end.")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required: a speech-LLM or SpeechRL LLM-ASR checkpoint folder")
        folder = Path(self.checkpoint)
        if not is_speech_llm(folder) and not (folder / LAYOUT_FILE).is_file():
            raise ValueError(f"{folder} is neither a Qwen3-ASR / Qwen2-Audio checkpoint folder (config.json with "
                             f"model_type qwen3_asr or qwen2_audio) nor a SpeechRL policy folder ({LAYOUT_FILE})")
        if self.rollout_backend not in ("transformers", "vllm"):
            raise ValueError(f"rollout_backend must be transformers or vllm, got {self.rollout_backend!r}")


def job_config(config: FinetuneConfig, manifest: Path) -> AsrJobConfig:
    """The asr-grpo job over the stack stack_environment started (its ports are in the environment)."""
    ports = {name: os.environ[f"SPEECHRL_{name.upper()}_PORT"] for name in STACK}
    return AsrJobConfig(
        policy=str(Path(config.checkpoint).resolve()), data=str(manifest), out_dir=str(Path(config.out) / "run"),
        steps=config.steps, eval_split="dev", eval_size=config.eval_size, eval_every=5, checkpoint_every=config.steps,
        device=config.device, encoder=f"127.0.0.1:{ports['encoder']}", rollout=f"127.0.0.1:{ports['rollout']}",
        rules=f"127.0.0.1:{ports['rules']}", asr_prompt=config.prompt,
        grpo=GRPOConfig(group_size=config.group_size, batch_size=config.batch_size, learning_rate=config.learning_rate,
                        kl_beta=config.kl_beta, lora=config.lora, mini_batch_size=config.group_size * 2,
                        gradient_accumulation_steps=max(1, config.batch_size // 2)))


def run(config: FinetuneConfig) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Path(config.data) if config.data else None
    if manifest is None:
        print(f"[1/3] speaking a small English corpus into {out / 'data'}", flush=True)
        manifest = build_asr_dataset(DataConfig(out=str(out / "data"), train=64, dev=config.eval_size, test=0,
                                                long_test=0))
    policy = Path(config.checkpoint)
    environment = stack_environment(policy, out / "stack")
    # The services compute on the job's device; on a GPU each takes its turn under the device's lease and
    # frees the memory between turns (vLLM by its sleep mode), as the trainer does between updates.
    residency = {"encoder": "offload", "rollout": "sleep" if config.rollout_backend == "vllm" else "offload"}
    for service in ("encoder", "rollout"):
        environment[f"SPEECHRL_{service.upper()}_DEVICE"] = config.device
        if config.device.startswith("cuda"):
            environment[f"SPEECHRL_{service.upper()}_LEASE_DEVICE"] = config.device
            environment[f"SPEECHRL_{service.upper()}_RESIDENCY"] = residency[service]
    if config.lora and config.rollout_backend == "vllm":
        environment["SPEECHRL_ROLLOUT_MAX_LORA_RANK"] = str(GRPOConfig().lora_r)
    os.environ.update(environment)
    print(f"[2/3] starting the services (rollout on {config.rollout_backend})", flush=True)
    with stack.running(STACK, stack.StackPaths(Path(environment["SPEECHRL_HOME"]).resolve()), timeout=900,
                       rollout_backend="vllm" if config.rollout_backend == "vllm" else ""):
        print(f"[3/3] GRPO, {config.steps} steps, on {policy}", flush=True)
        summary = run_job("asr-grpo", job_config(config, manifest),
                          LineProgress("GRPO", ("reward_mean", "wer", "insertions", "kl", "eval/wer")))
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = list(argv if argv is not None else [])
    if args[:1] == ["finetune"]:
        args = args[1:]
    if args and not args[0].startswith("-"):  # the checkpoint as a positional argument
        args = ["--checkpoint", args[0], *args[1:]]
    run(parse_config(FinetuneConfig, "finetune", args, description=__doc__ or "", prog="speechrl finetune"))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

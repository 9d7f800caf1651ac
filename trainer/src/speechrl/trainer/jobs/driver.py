"""The one training driver: runs (or resumes) a job of any kind to its last step.

    run(kind, config, progress):
        setup     resume from the newest checkpoint; policy (LoRA adapters when asked), reference,
                  optimizer; under torchrun a data-parallel update (core/distributed.py)
        connect   the kind's services; push the weights with a version newer than the rollout
                  service's and the checkpoint's, so every later sample is provably ours
        per step  kind.collect (prompts -> rollouts -> rewards) -> update (the trainer's turn on its
                  device, turn.py: under the device's GPU lease, priority "high", its memory moved in
                  and out; a lost lease undoes the update, which is retried once from the same
                  rollouts) -> sync (new weights to the rollout service with the update's fencing
                  token; its reply must echo the new version) -> kind.evaluate when due
                  -> metrics.jsonl, TensorBoard, the trackers asked for (trackers.py), progress, a
                  checkpoint every checkpoint_every steps
        finish    summary.json and training.png (uploaded to the trackers)

The lease is never optional where a device is shared: a job on cuda:N takes cuda:N's lease unless
its lease_device says "none" (the device is its own), and between updates its policy, reference
and optimizer state leave the device (residency "offload", the default on a leased CUDA device).

Under torchrun with several processes (`torchrun --nproc-per-node 2 -m speechrl.trainer.jobs.cli
train job.yaml`) rank 0 runs the job and ranks > 0 only their part of each update, each under the
lease of its own device; they return {} and write nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from speechrl.services import tracing
from speechrl.services.lease import GpuLease, LeaseLost, LeaseSettings, lease_redis
from speechrl.services.ledger import DeviceLedger
from speechrl.services.residency import DeviceGuard
from speechrl.trainer.core import distributed
from speechrl.trainer.core.advantages import reward_statistics
from speechrl.trainer.core.config import LOGIT_LOSSES, GRPOConfig
from speechrl.trainer.core.policy import Reference, apply_lora, make_optimizer, make_reference, plain_state
from speechrl.trainer.core.step import grpo_update
from speechrl.trainer.jobs.checkpoint import (
    OptimizerState,
    TrainState,
    latest_checkpoint,
    load_optimizer,
    restore_rng,
    save_checkpoint,
)
from speechrl.trainer.jobs.kind import JobConfig, JobKind, Policy, Session
from speechrl.trainer.jobs.plots import plot_run
from speechrl.trainer.jobs.progress import MetricsLog, PhaseTimer, Progress
from speechrl.trainer.jobs.trackers import Trackers
from speechrl.trainer.jobs.turn import TrainerResidency, UpdateTurn
from speechrl.trainer.jobs.weights import check_on_policy, push_weights, sync_dir

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # a LoRA checkpoint's adapters, beside the merged model (what a resume reads)


class LeaseLostTwice(RuntimeError):
    """The update lost its GPU lease twice in a row: the device is contested or Redis unwell; the job stops."""


async def run(kind: JobKind, config: JobConfig, progress: Progress) -> dict[str, Any]:
    """Run (or resume) a job of kind to config.steps; returns the summary written to summary.json."""
    grpo = config.grpo
    launch = distributed.Launch.from_env()
    kind.check(config, distributed=launch is not None)
    if launch is not None:
        distributed.check_shardable(grpo, launch.world_size)
        config = for_rank(config, launch)
        control = distributed.init_process_group(torch.device(config.device))
    torch.manual_seed(grpo.seed)
    if launch is not None and not launch.is_main:
        await distributed.follow(sharded_update(kind, config), control,
                                 lambda: update_lease(lease_device_of(config), config.redis_url))
        return {}
    tracing.setup("speechrl-trainer")  # a span per step, one per phase, with SPEECHRL_TRACING (rank 0 only)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = {"kind": kind.name, **asdict(config)}
    (out / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    random.seed(config.seed)
    resume = latest_checkpoint(out)
    if launch is not None and grpo.lora:
        raise ValueError(f"grpo.lora with torchrun: {kind.name} runs LoRA in one process only; drop lora or torchrun")
    # Data-parallel, rank 0's policy is the unsharded CPU mirror that the I/O reads (distributed.py).
    policy = load_policy(kind, config, resume, device="cpu" if launch else config.device)
    optimizer: OptimizerState
    if launch is None:
        policy.model.train()
        reference = reference_of(kind, config, policy)
        optimizer = torch_optimizer = make_optimizer(policy.model, grpo)
        bound = functools.partial(grpo_update, policy.model, reference, torch_optimizer, config=grpo)
        modules = [policy.model, *([reference.model] if reference is not None else [])]
        residency = TrainerResidency(modules, torch_optimizer, config.device)
        guard = trainer_guard(config, residency)
        if guard.lease is not None and guard.policy == "offload":
            residency.offload("offload")  # nothing of ours on the shared device until our first grant
        turn = UpdateTurn(lambda batch, check: bound(batch, before_optimizer_step=check), guard, policy.model,
                          torch_optimizer)
    else:
        optimizer = parallel = distributed.DataParallelUpdate(sharded_update(kind, config), policy.model, control)
        # Rank 0 takes its own device's lease around the whole update; the shards' residency is FSDP2's
        # (its CPU offload policy under residency offload, distributed.shard_model).
        turn = UpdateTurn(lambda batch, check: parallel(batch), trainer_guard(config, None))
    state = TrainState()
    if resume is not None:
        state = TrainState.load(resume)
        load_optimizer(resume, optimizer)
        restore_rng(state)
    trackers = Trackers()  # none until started: a tracker that cannot start its run fails the job here
    try:
        trackers = Trackers.start(config.tracking, job, out)
        async with kind.connect(config, policy) as session:
            status = await session.rollout.get_service_status()
            # The rollout service may have restarted (version 0) or run ahead of our checkpoint: push our
            # weights with a version newer than both, so every later sample is provably ours.
            version = max(state.version, status.policy_version) + 1
            if grpo.lora:
                # An adapter is on-policy only on the base it trains on, and the service may serve other
                # weights (an earlier job's updates, another checkpoint): the base goes first.
                version = await push_weights(session.rollout, policy.model, sync_dir(config), version) + 1
            version = await push_weights(session.rollout, policy.model, sync_dir(config), version, grpo.lora)

            async def step(index: int, version: int) -> tuple[dict[str, Any], int]:
                with tracing.span("train.step", {"speechrl.step": index + 1, "speechrl.job_kind": kind.name}):
                    metrics, version = await train_step(session, index, version, turn, policy, config)
                state.fence = max(state.fence, int(metrics.get("fence", 0)))
                return metrics, version

            await train_loop(out, state, config.steps, progress, step,
                             lambda f: save_policy(kind, config, policy, f / "policy"), optimizer, version=version,
                             checkpoint_every=config.checkpoint_every, evaluate=session.evaluate,
                             trackers=trackers)
    except BaseException:
        trackers.finish([], failed=True)
        raise
    finally:
        await turn.aclose()
        if isinstance(optimizer, distributed.DataParallelUpdate):
            optimizer.close()  # ranks > 0 return
    summary = summarize(out, kind)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trackers.finish([out / "summary.json", out / "training.png"])
    return summary


async def train_step(session: Session, step: int, version: int, turn: UpdateTurn, policy: Policy,
                     config: JobConfig) -> tuple[dict[str, Any], int]:
    """collect (the kind's phases) -> update -> sync for one step; returns (metrics, version).

    An update that lost its lease left nothing behind (turn.py) and runs again on the same rollouts;
    a second loss in a row ends the job (LeaseLostTwice). Either way no weights were pushed.
    """
    timer = TracedPhaseTimer()
    collected = await session.collect(step, timer)
    check_on_policy(collected.sampled_versions, version)
    lost = 0
    with timer("update"):
        while True:
            try:
                update_metrics, fence = await turn.update(collected.batch)
                break
            except LeaseLost as exc:
                lost += 1
                if lost == 2:
                    raise LeaseLostTwice(f"step {step + 1}: the update lost its GPU lease twice in a row ({exc}); "
                                         "nothing of either attempt was kept or pushed. Is the device contested "
                                         "past lease_ttl_ms, or Redis unreachable?") from exc
                log.warning("step %d: %s; the update was undone and runs again on the same rollouts", step + 1, exc)
    with timer("sync"):
        version = await push_weights(session.rollout, policy.model, sync_dir(config), version + 1, config.grpo.lora,
                                     fence=fence)
    metrics: dict[str, Any] = {
        **update_metrics, **reward_statistics(collected.batch.rewards, config.grpo.group_size), **timer.seconds,
        **collected.metrics, "policy_version": version, "lease_lost": float(lost), "fence": fence,
    }
    return metrics, version


class TracedPhaseTimer(PhaseTimer):
    """A PhaseTimer whose phases are also spans (`train.encode`, ...), children of the step's, when tracing is on."""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with tracing.span(f"train.{name}"), super().__call__(name):
            yield


StepFn = Callable[[int, int], Awaitable[tuple[dict[str, Any], int]]]  # (step, version) -> (metrics, version)


async def train_loop(out: Path, state: TrainState, steps: int, progress: Progress, step: StepFn,
                     save_policy: Callable[[Path], None], optimizer: OptimizerState, *, version: int,
                     checkpoint_every: int, evaluate: Callable[[int, bool], Awaitable[dict[str, float]]] | None = None,
                     trackers: Trackers | None = None) -> None:
    """Run steps until state.step == steps (or cancelled): log, report, evaluate and checkpoint each.

    evaluate(step, last) returns the eval metrics due at that step ({} when none are due).
    save_policy(folder) writes the policy's weights into a checkpoint folder.
    """
    log = MetricsLog(out, state.step)
    progress.resumed(state.step)
    try:
        while state.step < steps and not progress.cancelled():
            metrics, version = await step(state.step, version)
            state.step += 1
            state.version = version
            last = state.step == steps
            if evaluate is not None:
                metrics.update(await evaluate(state.step, last))
            log.write(state.step, metrics)
            if trackers is not None:
                trackers.log_metrics(state.step, metrics)
            progress.report(state.step, steps, metrics)
            if last or state.step % checkpoint_every == 0:
                await asyncio.to_thread(save_checkpoint, out, state, save_policy, optimizer)
    finally:
        log.close()


def lease_device_of(config: JobConfig) -> str:
    """The device whose lease the update takes: lease_device, or for "auto" the update device when it is a
    GPU; "" (none) for "none" and for "auto" on a CPU.

    >>> from speechrl.trainer.jobs.kind import JobConfig
    >>> [lease_device_of(JobConfig(policy="p", data="d", device=d, lease_device=l))
    ...  for d, l in (("cuda:0", "auto"), ("cpu", "auto"), ("cuda:1", "none"), ("cpu", "cpu:0"))]
    ['cuda:0', '', '', 'cpu:0']
    """
    if config.lease_device == "auto":
        return config.device if config.device.startswith("cuda") else ""
    return "" if config.lease_device == "none" else config.lease_device


def for_rank(config: JobConfig, launch: distributed.Launch) -> JobConfig:
    """config as one torchrun rank runs it: its own device (cuda:LOCAL_RANK) and that device's lease
    (a node prefix kept: node-7/cuda:LOCAL_RANK), or no lease ("none") where the job takes none.

    >>> from speechrl.trainer.jobs.kind import JobConfig
    >>> ranked = for_rank(JobConfig(policy="p", data="d", device="cuda", lease_device="node-7/cuda:0"),
    ...                   distributed.Launch(rank=3, local_rank=1, world_size=4))
    >>> ranked.device, ranked.lease_device
    ('cuda:1', 'node-7/cuda:1')
    """
    device = launch.device(config.device)
    lease = launch.lease_device(lease_device_of(replace(config, device=device)))
    return replace(config, device=device, lease_device=lease or "none")


def with_lease_prefix(config: JobConfig, prefix: str) -> JobConfig:
    """config whose auto lease on a GPU is named prefix + device (Kubernetes names a node's GPU lease
    <node name>/cuda:0, since every pod calls its GPU cuda:0); unchanged without a prefix.

    >>> from speechrl.trainer.jobs.kind import JobConfig
    >>> with_lease_prefix(JobConfig(policy="p", data="d", device="cuda:0"), "node-7/").lease_device
    'node-7/cuda:0'
    """
    if prefix and lease_device_of(config) and config.lease_device == "auto":
        return replace(config, lease_device=prefix + config.device)
    return config


def residency_of(config: JobConfig) -> str:
    """keep or offload: "auto" offloads when the update takes the lease of a CUDA device (it is shared)."""
    if config.residency != "auto":
        return config.residency
    return "offload" if lease_device_of(config) and config.device.startswith("cuda") else "keep"


def trainer_guard(config: JobConfig, residency: TrainerResidency | None) -> DeviceGuard:
    """The DeviceGuard of the trainer's turn: the lease of lease_device_of(config) (priority high), the
    trainer's memory moved per residency_of(config), reported to the device-memory ledger."""
    device = lease_device_of(config)
    owner = f"trainer-{os.getpid()}"
    lease = ledger = None
    if device:
        lease = GpuLease(lease_redis(config.redis_url), owner=owner, settings=LeaseSettings(ttl_ms=config.lease_ttl_ms))
        ledger = DeviceLedger(config.redis_url, owner)
    model = residency if residency is not None else _Unmoved()
    return DeviceGuard(model, lease=lease, device=device or config.device,
                       policy=residency_of(config) if residency is not None else "keep", priority="high",
                       wait_timeout_s=600, ledger=ledger)


class _Unmoved:
    """The Residable of an update whose memory does not move (a data-parallel update's shards)."""

    def load_to_device(self) -> None:
        pass

    def offload(self, mode: str) -> None:
        pass


@contextlib.asynccontextmanager
async def update_lease(lease_device: str, redis_url: str) -> AsyncIterator[None]:
    """The GPU lease (priority high) of a data-parallel follower rank around its part of each update."""
    if not lease_device:
        yield
        return
    from speechrl.services.lease import GpuLease, LeaseUnavailable, lease_redis

    client = lease_redis(redis_url)
    lease = GpuLease(client, owner="trainer")
    try:
        async with contextlib.AsyncExitStack() as held:
            # A Redis outage (a restart) costs the step a wait, not the job: retry for up to a minute.
            for attempt in range(60):
                try:
                    await held.enter_async_context(lease.hold(lease_device, priority="high", timeout=600))
                    break
                except LeaseUnavailable:
                    if attempt == 59:
                        raise
                    await asyncio.sleep(1.0)
            yield
    finally:
        await client.aclose()


def load_policy(kind: JobKind, config: JobConfig, resume: Path | None, device: str) -> Policy:
    """The policy to train: the checkpoint's weights when resuming; with LoRA, the warm start plus adapters."""
    if not config.grpo.lora:
        return kind.policy_class.load(resume / "policy" if resume else config.policy, device=device)
    from peft import PeftModel

    policy = kind.policy_class.load(config.policy, device=device)
    if resume is not None:
        policy.model = PeftModel.from_pretrained(policy.model, resume / "policy" / ADAPTER_DIR, is_trainable=True)
    else:
        policy.model = apply_lora(policy.model, config.grpo)
    return policy


def save_policy(kind: JobKind, config: JobConfig, policy: Policy, folder: Path) -> None:
    """A checkpoint's weights: the whole policy folder; under LoRA, the adapters (a resume reads those) and
    the warm start with them merged in, so that every checkpoint loads with its family's own from_pretrained
    (a speech LLM's save_pretrained folder, a converted CosyVoice2 LLM) and can be taken elsewhere."""
    if not config.grpo.lora:
        policy.save(folder)
        return
    policy.model.save_pretrained(folder / ADAPTER_DIR)  # type: ignore[operator]  # a peft model
    merged = kind.policy_class.load(config.policy)  # the warm start on the CPU: the training copy stays as it is
    merged.model.load_state_dict(plain_state(policy.model, merge=True))  # type: ignore[arg-type]  # a peft model
    merged.save(folder)


def needs_reference(grpo: GRPOConfig) -> bool:
    """Whether the loss reads pi_ref: the GRPO KL term, or DiffRO's token KL."""
    return grpo.kl_beta > 0 or (grpo.loss in LOGIT_LOSSES and grpo.diffro_beta > 0)


def reference_of(kind: JobKind, config: JobConfig, policy: Policy) -> Reference | None:
    """pi_ref: the warm start (a LoRA policy with its adapters off, else a frozen copy), None when unused."""
    if not needs_reference(config.grpo):
        return None
    if config.grpo.lora:
        return make_reference(policy.model)
    return make_reference(kind.policy_class.load(config.policy, device=config.device).model)


def sharded_update(kind: JobKind, config: JobConfig) -> distributed.ShardedUpdate:
    """This rank's part of the data-parallel update, from the warm-start weights (rank 0 then sends its own)."""
    model = kind.policy_class.load(config.policy).model
    reference = make_reference(model) if needs_reference(config.grpo) else None
    return distributed.ShardedUpdate(model, reference, config.grpo, torch.device(config.device),
                                     offload=residency_of(config) == "offload")


def summarize(out: Path, kind: JobKind) -> dict[str, Any]:
    """First and last values of the kind's headline metrics (and of eval WER when evaluated), and the plot."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/wer" in r]
    summary: dict[str, Any] = {"steps": rows[-1]["step"] if rows else 0}
    for key in kind.summary_keys:
        if rows and key in rows[0]:
            summary[key] = {"first": rows[0][key], "last": rows[-1][key]}
    if evals:
        summary["eval_wer"] = {"first": evals[0]["eval/wer"], "last": evals[-1]["eval/wer"]}
    if rows:
        summary["plot"] = str(plot_run(rows, out / "training.png", kind.plot_components))
    return summary

"""The GRPO policy update data-parallel over torch.distributed ranks, with FSDP2, launched by torchrun.

    torchrun --nproc-per-node 2 -m speechrl.trainer.jobs.cli train job.yaml           # 2 GPUs (or 2 CPU processes)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m speechrl.trainer.jobs.cli train job.yaml                                    # 2 nodes of 8

Who does what. Rank 0 runs the job (jobs/driver.py's run): all service I/O (encode, rollout, score, weight
sync), metrics, checkpoints. It builds each step's RolloutBatch and broadcasts it, so every rank
holds the same full batch; ranks > 0 only follow rank 0's commands (`follow`). Each rank takes the
GPU lease of its own device (cuda:LOCAL_RANK) around its part of the update. Rank 0 keeps an
unsharded CPU copy of the policy (the "mirror") that it loads with the gathered weights after every
update: the weight push, the prompt embeddings and the checkpoints read it, unchanged from one process
(the price: one CPU copy of the weights on rank 0). Every rank reads the warm-start checkpoint
(config.policy) to build its model, so on several nodes it must be readable on each; rank 0 sends
its own weights and optimizer state (a resumed run's) to the others, and only rank 0 writes files.

What is sharded. Parameters, gradients and optimizer state: FSDP2 (`fully_shard`) units of one
decoder layer each, the input embedding, and the rest. Samples: every optimizer step's samples are
cut into world_size equal runs of whole groups, and rank r takes run r of every step
(`shard_rows`), so its k-th local optimizer step is its part of the k-th global one. So the prompts
of an optimizer step (batch_size with gradient_accumulation_steps=0) must be a multiple of the ranks.

What is reduced. Advantages are computed on the full batch before sharding (every rank has it), so
scale_rewards=batch divides by the whole batch's std; groups stay whole anyway, because a batch
stores each prompt once for its group. The loss normaliser Z of every optimizer step is all-reduced
(a sum of counts), so each rank's loss is its share of the step's loss; the gradients are therefore
reduce-scattered with SUM, not FSDP's default mean. The gradient norm is taken over all shards.
The metrics are all-reduced once at the end (sums, and token-weighted means).

The result is the update of one process on the same batch, up to the order of float sums
(tests/equivalence/test_distributed.py: two CPU processes on gloo against one). Needs untied input and output
embeddings (see `shard_model`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

from speechrl.trainer.core.advantages import group_advantages, reward_statistics
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.policy import Reference, make_optimizer
from speechrl.trainer.core.step import RolloutBatch, grpo_update

# Ranks > 0 wait on the control group while rank 0 does a step's service I/O (rollout, scoring,
# evaluation: minutes), which a collective's usual timeout (NCCL's watchdog: 10 min) calls a hang.
CONTROL_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch (its RANK, LOCAL_RANK and WORLD_SIZE)."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Launch | None:
        """The launch torchrun describes in the environment; None for a single process.

        >>> Launch.from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
        Launch(rank=1, local_rank=1, world_size=2)
        >>> Launch.from_env({}) is None, Launch.from_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        (True, None)
        """
        environ = os.environ if environ is None else environ
        world_size = int(environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return None
        return cls(int(environ["RANK"]), int(environ.get("LOCAL_RANK", environ["RANK"])), world_size)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that does the I/O."""
        return self.rank == 0

    def device(self, configured: str) -> str:
        """This rank's device for the configured one: any CUDA device becomes cuda:LOCAL_RANK.

        >>> Launch(3, 1, 4).device("cuda:0"), Launch(3, 1, 4).device("cpu")
        ('cuda:1', 'cpu')
        """
        kind = torch.device(configured).type
        return f"{kind}:{self.local_rank}" if kind != "cpu" else "cpu"

    def lease_device(self, configured: str) -> str:
        """This rank's GPU lease: the configured device's kind, indexed by LOCAL_RANK; empty (no lease) stays.

        >>> Launch(3, 1, 4).lease_device("cuda:0"), Launch(1, 1, 2).lease_device("cpu:0"), Launch(1, 1, 2).lease_device("")
        ('cuda:1', 'cpu:1', '')
        """
        return f"{configured.partition(':')[0]}:{self.local_rank}" if configured else ""


def init_process_group(device: torch.device) -> dist.ProcessGroup:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); returns the control group.

    The control group (gloo, on the CPU, CONTROL_TIMEOUT) carries rank 0's commands and batches.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    assert group is not None
    return group


# -- the model ---------------------------------------------------------------------------------


def shard_model(model: nn.Module, device: torch.device, offload: bool = False) -> nn.Module:
    """Shard a HF causal LM (or a peft model around one) over all ranks with FSDP2, in place; returns it.

    offload: FSDP2's CPU offload policy: the shards, their gradients and the optimizer state live in
    (pinned, on CUDA) host memory, each layer is copied in for its forward and backward and freed
    after, and the optimizer step runs on the CPU; so between updates the rank holds nothing on its
    GPU (the trainer's residency "offload" under torchrun).

    Units: each decoder layer (the model's `_no_split_modules`), the input embedding on its own,
    and the rest (the root); fully_shard moves this rank's shards to device. The embedding is a
    unit of its own because completion_logprobs looks it up outside the model's forward (the
    completion's embeddings, after an LLM-ASR's prompt embeddings); a warm-up forward makes the whole
    model the FSDP root before that first lookup. That is also why tied input and output
    embeddings are refused: one weight cannot sit in two units. Gradients are summed over ranks.
    """
    embedding, output = cast(Any, model).get_input_embeddings(), cast(Any, model).get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        raise ValueError("the model ties its input and output embeddings, which FSDP here cannot shard apart; "
                         "untie them (config.tie_word_embeddings=False, lm_head a copy of the embedding)")
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, offload_policy=policy)
    fully_shard(embedding, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Each rank's loss is already divided by the whole step's Z: the gradients add up.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # SUM, not PREMUL_SUM, which gloo lacks
    with torch.no_grad(), _on(device):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)  # FSDP's lazy init
    _reshard(model)
    return model


def _reshard(model: nn.Module) -> None:
    """Free every unit's gathered weights: the root keeps its own after a forward without backward
    (FSDP expects the backward next), and state dicts want every parameter sharded."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_reference(reference: Reference, policy: nn.Module, device: torch.device, offload: bool = False) -> Reference:
    """pi_ref next to a sharded policy: the policy itself for LoRA (adapters off), else a sharded copy."""
    if reference.adapters_off:
        return Reference(policy, adapters_off=True)
    return Reference(shard_model(reference.model, device, offload), adapters_off=False)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded weights, on rank 0's CPU ({} on other ranks). A collective: every rank calls it."""
    _reshard(model)
    return cast(dict[str, Tensor],
                get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def load_full_state_dict(model: nn.Module, state: Mapping[str, Tensor] | None) -> None:
    """Load rank 0's full weights into every rank's shards (other ranks pass None). A collective."""
    _reshard(model)
    set_model_state_dict(model, dict(state or {}),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state on rank 0 ({} elsewhere), in one process's optimizer.state_dict()
    layout (parameters by index), so a checkpoint resumes under any number of ranks. A collective."""
    state: dict[str, Any] = cast(Any, get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    if not state:
        return {}
    index: dict[str, int] = {}
    groups = [{**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: Mapping[str, Any] | None) -> None:
    """Load rank 0's optimizer.state_dict()-layout state into every rank's shards (others pass None)."""
    by_name: dict[str, Any] = {}
    if state:
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]  # index -> name
        by_name = {"state": {order[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# -- the batch ---------------------------------------------------------------------------------


def shard_rows(samples: int, group_size: int, step_size: int, world_size: int, rank: int) -> Tensor:
    """The samples [samples // world_size] that rank takes: its run of whole groups of every optimizer step.

    An optimizer step covers step_size consecutive samples (in rollout order, as in grpo_update);
    each step is cut into world_size equal runs, and rank r takes run r of every step.

    >>> shard_rows(samples=16, group_size=2, step_size=8, world_size=2, rank=1).tolist()
    [4, 5, 6, 7, 12, 13, 14, 15]
    """
    if samples % step_size:
        raise ValueError(f"{samples} samples do not split into optimizer steps of {step_size}: data-parallel, every "
                         f"step must split evenly over the ranks; make batch_size * group_size a multiple of "
                         f"mini_batch_size * gradient_accumulation_steps, or set gradient_accumulation_steps=0")
    if step_size % (world_size * group_size):
        raise ValueError(f"an optimizer step of {step_size} samples does not split into {world_size} ranks x whole "
                         f"groups of {group_size}; make the prompts of a step (batch_size, or mini_batch_size * "
                         f"gradient_accumulation_steps / group_size) a multiple of the number of ranks")
    part = step_size // world_size
    starts = torch.arange(0, samples, step_size) + rank * part  # [K] one per optimizer step
    return (starts[:, None] + torch.arange(part)).flatten()  # [K * part]


def check_shardable(config: GRPOConfig, world_size: int) -> None:
    """Raise ValueError now, not at the first update, when config's batches cannot be sharded over world_size.

    >>> check_shardable(GRPOConfig(batch_size=3, group_size=2, mini_batch_size=2), world_size=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: an optimizer step of 6 samples does not split into 2 ranks x whole groups of 2; ...
    """
    step = config.mini_batch_size * config.gradient_accumulation_steps or config.samples_per_batch
    shard_rows(config.samples_per_batch, config.group_size, step, world_size, rank=0)


def shard_batch(batch: RolloutBatch, config: GRPOConfig, world_size: int,
                rank: int) -> tuple[RolloutBatch, Tensor, GRPOConfig]:
    """This rank's part of a batch: (the shard, its rows [N / world_size] in the batch, its config).

    The shard's config has one rank's step (the global step / world_size samples) in micro-batches of
    at most mini_batch_size, so each rank needs no more memory than one process would.
    """
    samples, group = batch.completion_ids.shape[0], batch.group_size
    step = config.mini_batch_size * config.gradient_accumulation_steps or samples
    rows = shard_rows(samples, group, step, world_size, rank)  # [n]
    prompts = rows[::group] // group  # [n / G] whole groups: one prompt per group
    shard = RolloutBatch(
        completion_ids=batch.completion_ids[rows], completion_mask=batch.completion_mask[rows],
        rewards=[batch.rewards[i] for i in rows.tolist()], prompt_mask=batch.prompt_mask[prompts],
        prompt_ids=None if batch.prompt_ids is None else batch.prompt_ids[prompts],
        prompt_embeds=None if batch.prompt_embeds is None else batch.prompt_embeds[prompts])
    local = replace(config, batch_size=len(prompts))
    if config.gradient_accumulation_steps:
        part = step // world_size
        mini = max(d for d in range(1, min(config.mini_batch_size, part) + 1) if part % d == 0)
        local = replace(local, mini_batch_size=mini, gradient_accumulation_steps=part // mini)
    return shard, rows, local


def broadcast_batch(batch: RolloutBatch | None, group: dist.ProcessGroup | None = None) -> RolloutBatch:
    """Rank 0's batch on every rank (others pass None); pickled through CPU memory, a few MB for an ASR step."""
    box = [None if batch is None else batch.to(torch.device("cpu"))]
    dist.broadcast_object_list(box, src=0, group=group)
    assert box[0] is not None
    return box[0]


# -- the update --------------------------------------------------------------------------------


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    total = tensor.clone()
    dist.all_reduce(total)  # a sync point: once per optimizer step
    return total


SUMMED = ("loss", "tokens")  # each rank's loss is its share of the step's (divided by the global Z)
SHARED = ("grad_norm", "optimizer_steps")  # already the same on every rank
FULL_BATCH = ("advantage_mean", "advantage_std")  # recomputed from the full batch, as reward_statistics


def grpo_update_distributed(policy: nn.Module, reference: Reference | None, optimizer: torch.optim.Optimizer,
                            batch: RolloutBatch, config: GRPOConfig) -> dict[str, float]:
    """grpo_update of this rank's shard of batch; with every rank calling it on the same full batch,
    the same update and metrics as one process on the whole batch.

    policy is shard_model's, reference shard_reference's (or None when kl_beta is 0), optimizer over
    the sharded policy's parameters. Every rank runs as many forwards as the others (equal shards),
    which FSDP's collectives need.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    advantages, scored = group_advantages(batch.rewards, batch.group_size, config.scale_rewards,
                                          config.std_epsilon)  # [N], [N] of the full batch
    shard, rows, local = shard_batch(batch, config, world_size, rank)  # rows [N / world_size]
    metrics = grpo_update(policy, reference, optimizer, shard, local, shard_advantages=(advantages[rows], scored[rows]),
                          all_reduce=_all_reduce_sum)
    rewards = reward_statistics(batch.rewards, batch.group_size)  # of the full batch
    weighted = sorted(set(metrics) - set(SUMMED) - set(SHARED) - set(FULL_BATCH) - set(rewards))
    tokens = metrics["tokens"]
    device = next(policy.parameters()).device
    values = torch.tensor([metrics[k] for k in SUMMED] + [metrics[k] * tokens for k in weighted],
                          dtype=torch.float64, device=device)  # [S + W]
    dist.all_reduce(values)  # the metrics leave the device once, here
    sums = dict(zip(list(SUMMED) + weighted, values.tolist(), strict=True))
    kept = advantages[scored]  # [N_scored]
    return {
        **{k: sums[k] for k in SUMMED}, **{k: metrics[k] for k in SHARED},
        **{k: sums[k] / max(sums["tokens"], 1.0) for k in weighted},  # token-weighted over all ranks
        "advantage_mean": kept.mean().item() if kept.numel() else 0.0,
        "advantage_std": kept.std().item() if kept.numel() > 1 else 0.0,
        **rewards,
    }


def _on(device: torch.device) -> AbstractContextManager[Any]:
    """CUDA's current device is per thread, and the update runs in asyncio.to_thread's threads."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class ShardedUpdate:
    """One rank's part of the data-parallel update: its shards of the policy, the reference and the optimizer.

    Every method is a collective: all ranks call the same one in the same order (rank 0 through
    DataParallelUpdate, the others through follow).
    """

    def __init__(self, policy: nn.Module, reference: Reference | None, config: GRPOConfig, device: torch.device,
                 offload: bool = False):
        self.config, self.device = config, device
        self.policy = shard_model(policy, device, offload)
        self.reference = None if reference is None else shard_reference(reference, self.policy, device, offload)
        self.optimizer = make_optimizer(self.policy, config)  # over the shards: after fully_shard

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        with _on(self.device):
            return grpo_update_distributed(self.policy, self.reference, self.optimizer, batch, self.config)

    def gather_weights(self, _: object = None) -> dict[str, Tensor]:
        with _on(self.device):
            return full_state_dict(self.policy)

    def load_weights(self, state: Mapping[str, Tensor] | None) -> None:
        with _on(self.device):
            load_full_state_dict(self.policy, state)

    def gather_optimizer(self, _: object = None) -> dict[str, Any]:
        with _on(self.device):
            return full_optimizer_state(self.policy, self.optimizer)

    def load_optimizer(self, state: Mapping[str, Any] | None) -> None:
        with _on(self.device):
            load_full_optimizer_state(self.policy, self.optimizer, state)


STOP = "stop"


class DataParallelUpdate:
    """Rank 0's handle on the update of all ranks: `update(batch)` broadcasts the batch, runs rank 0's
    part, and loads the gathered weights into mirror (rank 0's unsharded CPU copy of the policy).

    It is also the optimizer a checkpoint saves and loads: state_dict() gathers the full optimizer
    state, load_state_dict() sends it to every rank's shards. Ranks > 0 run follow() meanwhile; close()
    ends them. At the start every rank takes mirror's weights (a resumed run's).
    """

    def __init__(self, sharded: ShardedUpdate, mirror: nn.Module, control: dist.ProcessGroup):
        self.sharded, self.mirror, self.control = sharded, mirror, control
        self._command("load_weights", local=mirror.state_dict())

    def _command(self, name: str, payload: Any = None, local: Any = None) -> Any:
        """Send (name, payload) to ranks > 0, then run the same method here with local (or payload)."""
        dist.broadcast_object_list([(name, payload)], src=0, group=self.control)
        return getattr(self.sharded, name)(payload if local is None else local)

    def __call__(self, batch: RolloutBatch) -> dict[str, float]:
        metrics = self._command("update", batch.to(torch.device("cpu")))
        self.mirror.load_state_dict(self._command("gather_weights"))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self._command("gather_optimizer")

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        self._command("load_optimizer", local=state_dict)

    def close(self) -> None:
        dist.broadcast_object_list([(STOP, None)], src=0, group=self.control)


async def follow(sharded: ShardedUpdate, control: dist.ProcessGroup,
                 lease: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
    """A rank > 0: run rank 0's commands until it stops; each update under this rank's lease (lease())."""
    while True:
        box: list[Any] = [None]
        await asyncio.to_thread(dist.broadcast_object_list, box, 0, control)
        name, payload = box[0]
        if name == STOP:
            return
        if name == "update":
            async with lease():
                await asyncio.to_thread(sharded.update, payload)
        else:
            await asyncio.to_thread(getattr(sharded, name), payload)

"""What a kind of training job is: the fields every job has, and the protocol a kind satisfies.

The driver (driver.py) owns what every kind does alike: resume, policy / reference / optimizer
setup, LoRA and data-parallel updates, the first weight push, the step loop with its lease,
weight sync, metrics, checkpoints, the summary and its plot. A kind says only what differs:

    config_class   its config dataclass (a JobConfig)
    policy_class   the policy family it trains: load(folder, device), .model, save(folder)
    connect()      its services for one run, as a Session:
        collect()    one step's prompts -> rollouts -> rewards -> a scored RolloutBatch
        evaluate()   the evaluation due after a step ({} when none is due)

A new kind is one module with a config, a policy family and a Session, plus one line in
registry.KINDS; docs/architecture.md walks through the TTS kinds as the example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from speechrl.client import AsyncRolloutClient
from speechrl.services.config import check_choices, from_mapping, option
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.step import RolloutBatch
from speechrl.trainer.jobs.progress import PhaseTimer
from speechrl.trainer.jobs.trackers import TrackingConfig


@dataclass
class JobConfig:
    """The fields every job kind has; a kind's config adds its own. `grpo` is the update's GRPOConfig,
    given as a mapping in a job file (`grpo: {group_size: 8, kl_beta: 0.05}`), and `tracking` its
    experiment trackers (`tracking: {trackers: [mlflow]}`, trackers.py)."""

    # A kind's reward components (reward_weights may name only these) and the weights of those a job
    # does not name (the others weigh 1).
    REWARD_COMPONENTS: ClassVar[tuple[str, ...]] = ()
    DEFAULT_WEIGHTS: ClassVar[Mapping[str, float]] = {}

    policy: str = option("", "Warm-start checkpoint folder of the kind's policy family (its save()).")
    data: str = option("", "Prompt file of the kind (jobs/datasets.py): an ASR manifest or a TTS corpus.")
    train_split: str = option("train", "Split(s) to sample prompts from, comma-separated.")
    steps: int = option(20, "Policy updates to run.")
    checkpoint_every: int = option(5, "Write a checkpoint every this many steps (and at the end).")
    out_dir: str = option("runs/job", "Run folder: metrics.jsonl, TensorBoard events, checkpoints, plot.")
    rollout: str = option("127.0.0.1:50055", "Rollout-generator endpoint(s).")
    sync_dir: str = option("", "Folder the rollout service reads new weights from; empty: <out_dir>/sync "
                                "(a shared volume in a cluster).")
    device: str = option("cpu", "Device of the policy update: cpu, or cuda:N.")
    lease_device: str = option("auto", "Whose GPU lease each update takes (priority high): auto (the update "
                                       "device's when it is a GPU, none on a CPU), none (the device is this "
                                       "job's alone), or a device name (e.g. cpu:0 to take turns on a CPU).")
    residency: Literal["auto", "keep", "offload"] = option(
        "auto", "Where the policy, reference and optimizer state wait between updates: keep (on the device), "
                "offload (in pinned CPU memory, back at the next grant), auto (offload when the update leases a "
                "CUDA device, else keep).")
    lease_ttl_ms: int = option(10_000, "TTL of the update's lease: a trainer that stops renewing it (a long "
                                       "pause, a partition) loses it this long after its last renewal, and its "
                                       "update is then undone.")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis of the GPU lease and the device-memory ledger.")
    seed: int = option(0, "Seed of prompt sampling and rollouts.")
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={
        "help": "GRPOConfig fields (group_size, batch_size, learning_rate, kl_beta, reward_weights, ...)."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={
        "help": "Experiment trackers besides metrics.jsonl and TensorBoard (TrackingConfig: trackers [mlflow, wandb], "
                "run_name, mlflow_tracking_uri, wandb_project, wandb_mode, ...); none by default."})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.lease_device == "":  # job files from before "auto": an empty lease_device never meant "no lease
            self.lease_device = "auto"  # on a shared GPU" on purpose
        if not self.policy or not self.data:
            raise ValueError("policy (a warm-start checkpoint) and data (a prompt file) are required")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if isinstance(self.grpo, Mapping):
            self.grpo = from_mapping(GRPOConfig, self.grpo, "grpo")
        if isinstance(self.tracking, Mapping):
            self.tracking = from_mapping(TrackingConfig, self.tracking, "tracking")
        for name in self.grpo.reward_weights:
            if name not in self.REWARD_COMPONENTS:
                raise ValueError(f"reward_weights names {name!r}; components are {', '.join(self.REWARD_COMPONENTS)}")
        weights = {**self.DEFAULT_WEIGHTS, **self.grpo.reward_weights}
        if weights != self.grpo.reward_weights:
            self.grpo = dataclasses.replace(self.grpo, reward_weights=weights)


class Policy(Protocol):
    """A policy family: the trainable causal LM (`model`) with what it needs to read prompts, saved as a
    folder that its own `load` (and the rollout service) reads back."""

    model: Any  # an nn.Module: a transformers causal LM, or the peft model wrapping it under LoRA

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> Policy: ...

    def save(self, folder: str | Path) -> Any: ...


@dataclass
class Collected:
    """One step's scored rollouts, ready for the update."""

    batch: RolloutBatch
    sampled_versions: list[int]  # the policy version each sample came from (all must be the current one)
    metrics: dict[str, Any]  # reward components, WER, ... of the rollouts


class Session(Protocol):
    """A kind's services for one run, connected."""

    rollout: AsyncRolloutClient  # the driver pushes the weights through it

    async def collect(self, step: int, timer: PhaseTimer) -> Collected:
        """Draw step's prompts, roll them out, score them; time each phase in timer."""
        ...

    async def evaluate(self, step: int, last: bool) -> dict[str, float]:
        """The evaluation due after step ({} when none is due)."""
        ...


class JobKind(Protocol):
    """A kind of training job, registered by name in registry.KINDS."""

    @property
    def name(self) -> str: ...

    @property
    def config_class(self) -> type[JobConfig]: ...

    @property
    def policy_class(self) -> type[Policy]: ...

    @property
    def plot_components(self) -> Mapping[str, str]:
        """Reward components to plot: metric key -> label."""
        ...

    @property
    def summary_keys(self) -> tuple[str, ...]:
        """Metrics whose first and last values summary.json keeps."""
        ...

    def job_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A job file's fields as this kind reads them (a kind may fill in its own settings)."""
        ...

    def check(self, config: Any, distributed: bool) -> None:
        """ValueError when this kind cannot run config (or under torchrun, when distributed)."""
        ...

    def connect(self, config: Any, policy: Any) -> AbstractAsyncContextManager[Session]:
        """The kind's services for one run of config with policy."""
        ...

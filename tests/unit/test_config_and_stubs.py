"""Configuration by flags and SPEECHRL_* variables, and freshness of the generated stubs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from speechrl.services.config import ServerConfig, add_arguments, from_namespace, parse_config
from speechrl.services.rules.server import RulesConfig

ROOT = Path(__file__).resolve().parents[2]


def test_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config(RulesConfig, "rules", []).max_batch_size == 32
    monkeypatch.setenv("SPEECHRL_RULES_MAX_BATCH_SIZE", "8")
    assert parse_config(RulesConfig, "rules", []).max_batch_size == 8
    assert parse_config(RulesConfig, "rules", ["--max-batch-size", "4"]).max_batch_size == 4


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="SPEECHRL_RULES_PORT"):
        from_namespace(RulesConfig, "rules", None, {"SPEECHRL_RULES_PORT": "eighty"})


def test_invariants_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="use 1 to turn batching off"):
        ServerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="cuda:N"):
        ServerConfig(device="tpu")


def test_every_field_has_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, RulesConfig)
    for action in parser._actions[1:]:
        assert action.help and "(default:" in action.help, action.dest


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_field_and_message_is_commented() -> None:
    for proto in (ROOT / "proto" / "speechrl" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            declares = (stripped.startswith(("message ", "enum ", "service ", "rpc "))
                        or (stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "option"))))
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {stripped}"

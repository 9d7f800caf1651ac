"""The `speechrl` command: serve one service, bring the local stack up or down, run the demo.

Other distributions add services and commands through entry points: a `speechrl.services` entry
`NAME = "module:main"` (a module with main(argv)) becomes `speechrl serve NAME`, a `speechrl.commands` entry `speechrl NAME`
(speechrl-trainer adds `serve trainer`, `train` and `demo`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

# Service name -> module with main(argv). Imported lazily so `speechrl serve rules` never loads torch.
SERVICE_MODULES = {
    "rules": "speechrl.services.rules.server",
    "intelligibility": "speechrl.services.intelligibility.server",
    "speaker": "speechrl.services.speaker.server",
    "encoder": "speechrl.services.encoder.server",
    "gateway": "speechrl.services.gateway.server",
    "rollout": "speechrl.services.rollout.server",
    "token2wav": "speechrl.services.token2wav.server",
}

# Other subcommands -> module with main(argv).
COMMAND_MODULES = {
    "up": "speechrl.services.stack",
    "down": "speechrl.services.stack",
    "status": "speechrl.services.stack",
    "score-demo": "speechrl.services.demo",
}

# Subcommands whose module takes the rest of the line as is, e.g. `speechrl gpu status`.
GROUP_MODULES = {
    "gpu": "speechrl.services.lease.status",
    "cosyvoice2": "speechrl.services.cosyvoice2",
}


def service_modules() -> dict[str, str]:
    """Every `speechrl serve` service -> its module (with main(argv)), other distributions' included."""
    return {**SERVICE_MODULES, **{entry.name: entry.module for entry in entry_points(group="speechrl.services")}}


def command_modules() -> dict[str, str]:
    """Every other `speechrl` command -> its module (with main(argv)), other distributions' included."""
    return {**COMMAND_MODULES, **{entry.name: entry.module for entry in entry_points(group="speechrl.commands")}}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    services, commands = service_modules(), command_modules()
    parser = argparse.ArgumentParser(prog="speechrl", description="SpeechRL reward services for speech RL.")
    parser.add_argument("command", choices=["serve", *commands, *GROUP_MODULES],
                        help="serve SERVICE: run one server; up/down/status: the local stack; demo: the main job (a short "
                             "RL run); score-demo: score generated speech; train JOB.yaml; gpu status: the GPU lease")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\nservices:", ", ".join(services))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        if not rest or rest[0] not in services:
            parser.error(f"serve needs a service: one of {', '.join(services)}")
        importlib.import_module(services[rest[0]]).main(rest[1:])
    elif command in GROUP_MODULES:
        importlib.import_module(GROUP_MODULES[command]).main(rest)
    elif command in commands:
        importlib.import_module(commands[command]).main([command, *rest])
    else:
        parser.error(f"unknown command {command!r}")


if __name__ == "__main__":
    main()

"""The `speechrl` command: serve one service, bring the local stack up or down, run the demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Service name -> module with main(argv). Imported lazily so `speechrl serve rules` never loads torch.
SERVICE_MODULES = {
    "rules": "speechrl.services.rules.server",
    "intelligibility": "speechrl.services.intelligibility.server",
    "speaker": "speechrl.services.speaker.server",
    "encoder": "speechrl.services.encoder.server",
    "gateway": "speechrl.services.gateway.server",
    "rollout": "speechrl.services.rollout.server",
    "token2wav": "speechrl.services.token2wav.server",
    "trainer": "speechrl.trainer.service",  # in the speechrl-trainer distribution
}

# Other subcommands -> module with main(argv).
COMMAND_MODULES = {
    "up": "speechrl.services.stack",
    "down": "speechrl.services.stack",
    "status": "speechrl.services.stack",
    "demo": "speechrl.trainer.demo",  # the main job: a short RL run (speechrl-trainer distribution)
    "score-demo": "speechrl.services.demo",
    "train": "speechrl.trainer.cli",  # in the speechrl-trainer distribution
}

# Subcommands whose module takes the rest of the line as is, e.g. `speechrl gpu status`.
GROUP_MODULES = {
    "gpu": "speechrl.services.lease.status",
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="speechrl", description="SpeechRL reward services for speech RL.")
    parser.add_argument("command", choices=["serve", *COMMAND_MODULES, *GROUP_MODULES],
                        help="serve SERVICE: run one server; up/down/status: the local stack; demo: the main job (a short "
                             "RL run); score-demo: score generated speech; train JOB.yaml; gpu status: the GPU lease")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\nservices:", ", ".join(SERVICE_MODULES))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        if not rest or rest[0] not in SERVICE_MODULES:
            parser.error(f"serve needs a service: one of {', '.join(SERVICE_MODULES)}")
        importlib.import_module(SERVICE_MODULES[rest[0]]).main(rest[1:])
    elif command in GROUP_MODULES:
        importlib.import_module(GROUP_MODULES[command]).main(rest)
    elif command in COMMAND_MODULES:
        importlib.import_module(COMMAND_MODULES[command]).main([command, *rest])
    else:
        parser.error(f"unknown command {command!r}")


if __name__ == "__main__":
    main()

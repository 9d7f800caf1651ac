"""Generate the Python stubs of proto/speechrl/v1 into the client distribution.

    python scripts/gen_protos.py          # write clients/src/speechrl/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check  # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "clients" / "src"
STUB_DIR = Path("speechrl") / "v1"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto and return the generated files, relative to out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / STUB_DIR).glob("*.proto"))
    (out_root / STUB_DIR).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
        f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
        *protos,
    ]
    subprocess.run(cmd, check=True)
    return sorted(p.relative_to(out_root) for p in (out_root / STUB_DIR).iterdir()
                  if p.name.endswith(STUB_SUFFIXES))


def stale_files() -> list[str]:
    """Generated files that differ from, or are missing in, the committed stubs."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = {p.relative_to(OUT_ROOT) for p in (OUT_ROOT / STUB_DIR).iterdir()
                     if p.name.endswith(STUB_SUFFIXES)}
        stale = [str(p) for p in fresh
                 if p not in committed or not filecmp.cmp(Path(tmp) / p, OUT_ROOT / p, shallow=False)]
        stale += [str(p) for p in committed - set(fresh)]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run scripts/gen_protos.py):", *stale, sep="\n  ")
            return 1
        print("generated stubs are fresh")
        return 0
    for path in generate(OUT_ROOT):
        print("wrote", OUT_ROOT / path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

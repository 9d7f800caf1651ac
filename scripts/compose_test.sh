#!/usr/bin/env bash
# `make compose-test`: the CPU compose stack built and run for real (tests/compose/). Starts a Docker
# engine where none answers (stopping it again at the end), adds Compose v2, builds the local base
# images where no registry can be reached and the `cpu` target of docker/Dockerfile, then runs the
# tests, which bring the stack up with `docker compose -f docker-compose.yml -f docker-compose.cpu.yml
# up -d --wait` and take it down with `down -v`.
#
#   SPEECHRL_COMPOSE_IMAGES=registry   use python:3.11-slim-bookworm and redis:7.4-bookworm from a
#                                      registry instead of the local Debian stand-ins
# Exit 0 with a skip message only where no engine can be had at all (not root, no docker access).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV=${SPEECHRL_VENV:-.venv}
# shellcheck source=scripts/docker_local.sh
source scripts/docker_local.sh

if [ "$(id -u)" -ne 0 ] && ! docker info >/dev/null 2>&1 && ! sudo -n true 2>/dev/null; then
  echo "compose-test: skipped: no Docker engine answers and none can be started without root"
  exit 0
fi
started=$(date +%s)
# Whatever happens to pytest (a failure, a timeout, Ctrl-C), the test project goes, then the engine
# this script started. tests/compose runs under this project name, never a user's own `speechrl`.
export COMPOSE_PROJECT_NAME=speechrl-compose-test
cleanup() {
  if [ -n "${DOCKER:-}" ] && "$DOCKER" info >/dev/null 2>&1; then
    "$DOCKER" compose -f docker-compose.yml -f docker-compose.cpu.yml \
      down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  docker_local_stop_engine
}
trap cleanup EXIT
docker_local_engine
docker_local_compose

build_args=()
if [ "${SPEECHRL_COMPOSE_IMAGES:-local}" = local ]; then
  docker_local_base_images
  # The torch CPU wheel lies in the base image's find-links folder, so pip's own sources serve it.
  build_args=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg TORCH_INDEX_URL=)
  export SPEECHRL_REDIS_IMAGE=$REDIS_IMAGE
fi
echo "compose-test: building ${SPEECHRL_IMAGE_REPO:-speechrl}:cpu (log: $DOCKER_LOCAL_CACHE/build-cpu.log)"
if ! "$DOCKER" build --progress=plain -f docker/Dockerfile --target cpu "${build_args[@]}" \
     -t "${SPEECHRL_IMAGE_REPO:-speechrl}:cpu" . >"$DOCKER_LOCAL_CACHE/build-cpu.log" 2>&1; then
  tail -n 40 "$DOCKER_LOCAL_CACHE/build-cpu.log" >&2
  exit 1
fi
# The cuda target is build-checked only where its base image is on the engine already.
cuda_base=$(sed -n 's/^ARG CUDA_IMAGE=//p' docker/Dockerfile)
if "$DOCKER" image inspect "$cuda_base" >/dev/null 2>&1; then
  echo "compose-test: building ${SPEECHRL_IMAGE_REPO:-speechrl}:cuda (log: $DOCKER_LOCAL_CACHE/build-cuda.log)"
  "$DOCKER" build --progress=plain -f docker/Dockerfile --target cuda -t "${SPEECHRL_IMAGE_REPO:-speechrl}:cuda" . \
    >"$DOCKER_LOCAL_CACHE/build-cuda.log" 2>&1 || { tail -n 40 "$DOCKER_LOCAL_CACHE/build-cuda.log" >&2; exit 1; }
else
  echo "compose-test: the cuda target is not built: its base image $cuda_base is not on this engine"
fi
echo "compose-test: images ready after $(( $(date +%s) - started )) s"

export OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
SPEECHRL_COMPOSE_TEST=1 "$VENV/bin/pytest" tests/compose -p no:cacheprovider "$@"
echo "compose-test: passed in $(( $(date +%s) - started )) s"

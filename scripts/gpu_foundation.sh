#!/usr/bin/env bash
# One device call for the foundation: GPU tests of the torch backends and harness, then the seed's
# benchmark commands. Writes under $OUT (at most 8 files come back: keep the plots few).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q tests/test_presets.py tests/test_routing.py tests/test_weights.py tests/test_backends.py \
  tests/test_bench.py tests/test_env.py 2>&1 | tail -n 5
python3 -m moe_tut.bench --config mixtral --batch 16 --seq 512 --out "$OUT/mixtral_b16_s512" 2>/dev/null
if [ "${FULL:-0}" = 1 ]; then
  python3 -m moe_tut.bench --full --tokens 1 16 128 1024 8192 --out "$OUT/full" --no-plots 2>/dev/null
fi

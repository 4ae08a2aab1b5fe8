#!/usr/bin/env bash
# One device call for the foundation: GPU tests, then the seed's benchmark commands. Writes under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests 2>&1 | tail -n 15
python3 -m moe_tut.bench --config mixtral --batch 16 --seq 512 --out "$OUT/mixtral" 2>/dev/null
python3 -m moe_tut.bench --full --tokens 1 16 128 1024 8192 --out "$OUT/full" 2>/dev/null

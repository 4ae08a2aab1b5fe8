#!/usr/bin/env bash
# Expert parallelism on one host with 2 GPUs (NCCL), in one call of about 3-6 minutes:
#   1. the 2-GPU tests (tests/test_parallel.py, `gpu` marker): NCCL ranks against the single-GPU forward;
#   2. deepseek-v3 at T = 8192 global tokens, the triton backend, on 2 GPUs (128 experts each) vs 1 GPU
#      (all 256 experts, 22.5 GB), with the dispatch / compute / combine split;
#   3. the same with triton_int4, if at least SECOND_RUN_MIN_LEFT_S of the budget are left.
# Writes under $OUT (6 files at most: the device machine returns 8): one log with everything printed,
# and per backend the benchmark's moe_ep_bench.csv + .json (+ .png for triton).
# The commit recorded in the JSON comes from MOE_TUT_GIT_COMMIT where the tree has no .git.
#
#   OUT=out/ep bash scripts/gpu_expert_parallel.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts (NCCL, PyTorch symmetric memory, NVSHMEM): keep these set.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out}
BUDGET_S=${BUDGET_S:-340}
SECOND_RUN_MIN_LEFT_S=${SECOND_RUN_MIN_LEFT_S:-120}
mkdir -p "$OUT"
LOG="$OUT/gpu_expert_parallel_log.txt"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  nvidia-smi topo -m  # how the two GPUs are linked (NVLink or PCIe): the all-to-all's bandwidth depends on it
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'gpus', torch.cuda.device_count())"
  echo "commit: ${MOE_TUT_GIT_COMMIT:-unknown}"
} 2>&1 | tee -a "$LOG"

say "== 2-GPU tests (NCCL) =="
timeout 170 python3 -m pytest -q -m gpu tests/test_parallel.py -rs 2>&1 | tail -n 20 | tee -a "$LOG"

run_ep() {  # $1 backend, $2 time limit (s), $3 extra flags
  local dir="$OUT/deepseek-v3_T8192_$1"
  say "== expert parallel: deepseek-v3, T=8192, $1, 2 GPUs vs 1 (limit $2 s) =="
  timeout --kill-after=10 "$2" python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m moe_tut.bench --expert-parallel --config deepseek-v3 --tokens 8192 --backends "$1" \
    --timeout 150 --out "$dir" $3 >> "$LOG" 2>&1
  local rc=$?
  say "exit code $rc"
  sed -n '/^config /,/^wrote /p' "$LOG" | tail -n 8
}

run_ep triton 180 ""
left=$((BUDGET_S - SECONDS))
if [ "$left" -ge "$SECOND_RUN_MIN_LEFT_S" ]; then
  run_ep triton_int4 "$left" "--no-plots"
else
  say "skipping triton_int4: ${left} s of the ${BUDGET_S} s budget left (< ${SECOND_RUN_MIN_LEFT_S})"
fi
say "total ${SECONDS} s"

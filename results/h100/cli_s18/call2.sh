#!/bin/bash
# session 18 call 2: CLI snapshot at 3aedad2 (decode tile 3 stages, direct launches) of the issue presets
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
for p in mixtral deepseek deepseek-v3 qwen3-30b-a3b glm-4.5 glm5; do
  s=$(date +%s)
  timeout 95 python -m moe_tut.bench --config $p --tokens 1 16 128 1024 8192 --backends naive,bmm,grouped_mm,triton,triton_int4 --out $OUT/$p > $OUT/cli_$p.log 2>&1
  echo "$p rc=$? $(( $(date +%s) - s )) s"
done

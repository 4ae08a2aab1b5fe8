#!/bin/bash
# session 18 call 7: the CLI for qwen3-30b-a3b at HEAD (all of this session's host trims), and host vs graph there
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
timeout 100 python -m moe_tut.bench --config qwen3-30b-a3b --tokens 1 16 128 1024 8192 --backends grouped_mm,triton,triton_int4 --no-plots --out $OUT/q > $OUT/cli_qwen3.log 2>&1
tr '\r' '\n' < $OUT/cli_qwen3.log | grep -E "^qwen3|ceilings"
timeout 60 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b --tokens 128 1024 --backends triton,triton_int4 --reps 50 --trials 3 --out $OUT/h > $OUT/host_qwen3.log 2>&1
grep -E "^qwen3" $OUT/host_qwen3.log

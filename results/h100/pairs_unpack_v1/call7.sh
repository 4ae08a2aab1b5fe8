#!/bin/bash
# session 16 call 7: triton_int4's decode/prefill boundary (bf16's 8 rows per expert) at 16 and 32 rows
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=a3283d7
S="--setting d8: --setting d16:MOE_TUT_DECODE_MAX_ROWS=16 --setting d32:MOE_TUT_DECODE_MAX_ROWS=32"
timeout 200 python scripts/gpu_env_ab.py $S --presets mixtral --tokens 64 128 --backends triton_int4 --passes 2 --name bound_a > $OUT/b_a.log 2>&1
grep -h "T=" $OUT/b_a.log
timeout 350 python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b --tokens 256 512 --backends triton_int4 --passes 2 --name bound_b > $OUT/b_b.log 2>&1
timeout 350 python scripts/gpu_env_ab.py $S --presets glm-4.5 --tokens 320 640 --backends triton_int4 --passes 2 --name bound_c > $OUT/b_c.log 2>&1
grep -h "T=" $OUT/b_b.log $OUT/b_c.log
timeout 350 python scripts/gpu_env_ab.py $S --presets deepseek-v3 --tokens 512 1024 --backends triton_int4 --passes 2 --name bound_d > $OUT/b_d.log 2>&1
grep -h "T=" $OUT/b_d.log

#!/bin/bash
# session 16 call 6: decode tile 3 stages vs 4 (default) across the tl.dot decode points
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=a3283d7
C=MOE_TUT_TRITON_INT4_CONFIG
S="--setting s4: --setting s3:$C=16,64,128,8,4,3"
timeout 250 python scripts/gpu_env_ab.py $S --presets mixtral --tokens 8 16 32 64 --backends triton_int4 --passes 3 --name stages_a > $OUT/st_a.log 2>&1
grep -h "T=" $OUT/st_a.log
timeout 300 python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b glm-4.5 deepseek-v3 --tokens 64 128 --backends triton_int4 --passes 2 --name stages_b > $OUT/st_b.log 2>&1
grep -h "T=" $OUT/st_b.log

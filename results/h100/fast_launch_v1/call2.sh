#!/bin/bash
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=e0d5a88
for spec in "qwen3-30b-a3b 1024 triton_int4" "qwen3-30b-a3b 1024 triton" "qwen3-30b-a3b 128 triton_int4" "mixtral 1024 triton_int4"; do
  timeout 120 python .scratch/s17/host_stages.py $spec 2>&1 | grep -v Warn
done
timeout 200 python scripts/gpu_env_ab.py --setting "a:" --setting "b:" --presets mixtral --tokens 128 --backends triton triton_int4 --passes 2 --name t128 > $OUT/t128.log 2>&1; grep -h "T=\|BLOCK\|choice" $OUT/t128.log | tail -30

#!/bin/bash
# session 17 call 1: host-time profile of eager forwards; mixtral T=128 int4 rerun; decode s3 vs s4 at T=16
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=e0d5a88
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
timeout 200 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b mixtral --tokens 128 1024 --backends grouped_mm,triton,triton_int4 --reps 50 --out $OUT > $OUT/host.log 2>&1; tail -20 $OUT/host.log
for spec in "qwen3-30b-a3b 1024 triton" "qwen3-30b-a3b 1024 triton_int4" "mixtral 128 triton_int4"; do
  set -- $spec
  timeout 120 python scripts/gpu_profile_host.py --preset $1 --tokens $2 --backend $3 --reps 30 --top 30 > $OUT/prof_$1_$2_$3.log 2>&1
  echo "== $spec"; head -60 $OUT/prof_$1_$2_$3.log | cut -c1-200
done
timeout 200 python scripts/gpu_env_ab.py --setting "a:" --presets mixtral --tokens 128 --backends triton triton_int4 --passes 3 --name t128 > $OUT/t128.log 2>&1; grep -h "T=\|BLOCK\|choice\|:" $OUT/t128.log | tail -30
C=MOE_TUT_TRITON_INT4_CONFIG
timeout 250 python scripts/gpu_env_ab.py --setting s4: --setting s3:$C=16,64,128,8,4,3 --presets mixtral deepseek-v3 --tokens 16 --backends triton_int4 --passes 4 --name s3_t16 > $OUT/s3.log 2>&1; grep -h "T=" $OUT/s3.log

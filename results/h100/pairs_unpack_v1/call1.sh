#!/bin/bash
# session 16 call 1: GPU tests (int4 + grouped_gemm), then pairs vs quad A/B on the tl.dot decode points
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=${REV:-aac532f+pairs}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
timeout 200 python -m pytest -q -m gpu tests/test_triton_int4.py > $OUT/gpu_tests_int4.txt 2>&1
tail -2 $OUT/gpu_tests_int4.txt
if grep -q failed $OUT/gpu_tests_int4.txt; then grep -E "Error|assert|FAILED" $OUT/gpu_tests_int4.txt | head -30; exit 1; fi
timeout 120 python -m pytest -q -m gpu tests/test_triton_grouped_gemm.py > $OUT/gpu_tests_gg.txt 2>&1
tail -2 $OUT/gpu_tests_gg.txt
D="magic,post,split,asm,ppsm=64,gemv=4,gemvrows=1"
S="--setting pairs: --setting quad:MOE_TUT_TRITON_INT4_VARIANT=$D"
python scripts/gpu_env_ab.py $S --presets mixtral --tokens 8 16 32 --backends triton_int4 --passes 3 --name pairs_mixtral > $OUT/ab_a.log 2>&1
grep -h "T=" $OUT/ab_a.log
python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b glm-4.5 --tokens 32 64 --backends triton_int4 --passes 2 --name pairs_b > $OUT/ab_b.log 2>&1
python scripts/gpu_env_ab.py $S --presets deepseek-v3 --tokens 64 256 --backends triton_int4 --passes 2 --name pairs_c > $OUT/ab_c.log 2>&1
grep -h "T=" $OUT/ab_b.log $OUT/ab_c.log

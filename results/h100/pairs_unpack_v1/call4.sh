#!/bin/bash
# session 16 call 4: d1a923f on the GPU: int4 GPU tests, default vs quad vs PDL off, CLI mixtral + deepseek-v3
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=d1a923f
timeout 200 python -m pytest -q -m gpu tests/test_triton_int4.py > $OUT/gpu_tests_int4_d1a923f.txt 2>&1
tail -2 $OUT/gpu_tests_int4_d1a923f.txt
if grep -q failed $OUT/gpu_tests_int4_d1a923f.txt; then grep -E "Error|assert|FAILED" $OUT/gpu_tests_int4_d1a923f.txt | head -30; exit 1; fi
D="magic,post,split,asm,ppsm=64,gemv=4,gemvrows=1"
S="--setting default: --setting quad:MOE_TUT_TRITON_INT4_VARIANT=$D --setting nopdl:MOE_TUT_PDL=0"
timeout 150 python scripts/gpu_env_ab.py $S --presets mixtral --tokens 16 32 --backends triton_int4 --passes 3 --name final_mixtral > $OUT/ab_a.log 2>&1
grep -h "T=" $OUT/ab_a.log
for P in mixtral deepseek-v3; do
  timeout 200 python -m moe_tut.bench --config $P --tokens 1 16 128 1024 8192 --backends grouped_mm,triton,triton_int4 --out $OUT/$P > $OUT/cli_$P.log 2>&1
  tail -25 $OUT/cli_$P.log
done

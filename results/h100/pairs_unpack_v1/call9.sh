#!/bin/bash
# session 16 call 9: Int4Variant 'overlap' (GEMM2 waits on GEMM1's row blocks under PDL): GPU tests, then A/B
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=${REV:-cb9c225+overlap}
timeout 120 python -m pytest -q -m gpu tests/test_triton_int4.py -k "overlap or unpack_forms or graph" > $OUT/gpu_tests_overlap.txt 2>&1
tail -2 $OUT/gpu_tests_overlap.txt
if grep -q failed $OUT/gpu_tests_overlap.txt; then grep -E "Error|assert|FAILED" $OUT/gpu_tests_overlap.txt | head -30; exit 1; fi
timeout 100 python -m pytest -q -m gpu tests/test_pdl.py > $OUT/gpu_tests_pdl.txt 2>&1; tail -1 $OUT/gpu_tests_pdl.txt
D="magic,post,split,asm,pairs,ppsm=64,gemv=4,gemvrows=1"
S="--setting default: --setting overlap:MOE_TUT_TRITON_INT4_VARIANT=$D,overlap"
timeout 200 python scripts/gpu_env_ab.py $S --presets mixtral --tokens 8 16 32 64 --backends triton_int4 --passes 3 --name overlap_a > $OUT/ov_a.log 2>&1
grep -h "T=" $OUT/ov_a.log
timeout 250 python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b glm-4.5 deepseek-v3 --tokens 32 64 256 --backends triton_int4 --passes 2 --name overlap_b > $OUT/ov_b.log 2>&1
grep -h "T=" $OUT/ov_b.log

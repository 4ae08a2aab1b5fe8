#!/bin/bash
# session 16 call 11: GPU tests at 4230135 (int4, grouped_gemm, pdl), then the prefill ratio
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=4230135
timeout 240 python -m pytest -q -m gpu tests/test_triton_int4.py tests/test_pdl.py > $OUT/gpu_tests_int4_pdl_4230135.txt 2>&1
tail -2 $OUT/gpu_tests_int4_pdl_4230135.txt
grep -E "FAILED" $OUT/gpu_tests_int4_pdl_4230135.txt | head
timeout 120 python -m pytest -q -m gpu tests/test_triton_grouped_gemm.py > $OUT/gpu_tests_gg_4230135.txt 2>&1
tail -1 $OUT/gpu_tests_gg_4230135.txt
timeout 200 python scripts/gpu_prefill_ratio.py --presets mixtral deepseek-v3 qwen3-30b-a3b --pairs 5 --out $OUT > $OUT/ratio.log 2>&1
grep -E "median|copy" $OUT/ratio.log

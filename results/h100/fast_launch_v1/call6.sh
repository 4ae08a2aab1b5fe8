#!/bin/bash
# session 17 call 6: final tree (launch key/heuristics tidy, host cdiv, cached INT4 candidates): GPU tests, host A/B
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s17/rev 2>/dev/null)
timeout 130 python -m pytest -m gpu -q tests/test_launch.py tests/test_pdl.py tests/test_plan_kernel.py > $OUT/gpu_tests_a.txt 2>&1; tail -3 $OUT/gpu_tests_a.txt
timeout 90 python -m pytest -m gpu -q tests/test_triton_grouped_gemm.py > $OUT/gpu_tests_b.txt 2>&1; tail -3 $OUT/gpu_tests_b.txt
mkdir -p $OUT/q $OUT/m
timeout 60 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b --tokens 1024 --backends triton,triton_int4 --reps 30 --trials 4 --fast-launch-ab --out $OUT/q > $OUT/host_ab_q.log 2>&1; tail -5 $OUT/host_ab_q.log
timeout 60 python scripts/gpu_host_overhead.py --presets mixtral --tokens 1 128 --backends triton,triton_int4 --reps 30 --trials 4 --fast-launch-ab --out $OUT/m > $OUT/host_ab_m.log 2>&1; tail -9 $OUT/host_ab_m.log

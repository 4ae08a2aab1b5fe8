#!/bin/bash
# session 17 call 4: direct launches with heuristics support: host time A/B, GPU tests
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=wip-launch2
timeout 120 python -m pytest -m gpu -q -x tests/test_launch.py > $OUT/gpu_tests_launch.txt 2>&1; tail -4 $OUT/gpu_tests_launch.txt
timeout 280 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b mixtral --tokens 1 16 128 1024 --backends triton,triton_int4,grouped_mm --reps 30 --trials 5 --fast-launch-ab --out $OUT > $OUT/host_ab.log 2>&1; tail -50 $OUT/host_ab.log
MOE_TUT_FAST_LAUNCH=1 timeout 60 python .scratch/s17/host_stages.py qwen3-30b-a3b 1024 triton_int4 2>&1 | grep -v Warn | head -11
timeout 420 python -m pytest -m gpu -q -x tests/test_plan_kernel.py tests/test_pdl.py tests/test_triton_int4_gemv.py tests/test_triton_int4.py tests/test_triton_grouped_gemm.py > $OUT/gpu_tests.txt 2>&1; tail -5 $OUT/gpu_tests.txt

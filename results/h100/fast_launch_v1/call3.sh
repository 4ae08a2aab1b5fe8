#!/bin/bash
# session 17 call 3: direct launches (kernels/launch.py): host time on/off, GPU tests
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=wip-launch
for fl in 0 1; do
  echo "=== MOE_TUT_FAST_LAUNCH=$fl"
  MOE_TUT_FAST_LAUNCH=$fl timeout 200 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b mixtral --tokens 1 16 128 1024 --backends grouped_mm,triton,triton_int4 --reps 50 --out $OUT > $OUT/host_$fl.log 2>&1; tail -25 $OUT/host_$fl.log
  cp $OUT/host_overhead.csv $OUT/host_overhead_fl$fl.csv
done
MOE_TUT_FAST_LAUNCH=1 timeout 60 python .scratch/s17/host_stages.py qwen3-30b-a3b 1024 triton_int4 2>&1 | grep -v Warn | head -12
timeout 480 python -m pytest -m gpu -q -x tests/test_launch.py tests/test_plan_kernel.py tests/test_pdl.py tests/test_triton_int4_gemv.py tests/test_triton_int4.py tests/test_triton_grouped_gemm.py > $OUT/gpu_tests.txt 2>&1; tail -15 $OUT/gpu_tests.txt

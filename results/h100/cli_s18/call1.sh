#!/bin/bash
# session 18 call 1: every GPU test suite of the kernels at HEAD (decode tile 3 stages), four pytest processes at once
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
run() { name=$1; shift; timeout 330 python -m pytest -m gpu -q -p no:cacheprovider --durations=5 "$@" > $OUT/gpu_tests_$name.txt 2>&1; echo "$name rc=$?" >> $OUT/rcs.txt; }
run a tests/test_launch.py tests/test_pdl.py tests/test_plan_kernel.py tests/test_backends.py &
run b tests/test_triton_int4_gemv.py &
run c tests/test_triton_int4.py &
run d tests/test_triton_grouped_gemm.py tests/test_hf.py tests/test_bench.py &
wait
cat $OUT/rcs.txt
for f in $OUT/gpu_tests_*.txt; do echo "== $f"; grep -E "passed|failed|error" $f | tail -n 2; grep -E "^FAILED|^ERROR" $f | head -5; done

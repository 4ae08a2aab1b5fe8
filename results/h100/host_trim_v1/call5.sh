#!/bin/bash
# session 18 call 5: eager host A/B of launch.py's fixed heuristics (old = e5ac4dd, new = HEAD), alternating
# processes; then every GPU test of the kernels at HEAD, four pytest processes at once
export TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
for i in 1 2; do for tree in old2 new; do
  pp=$PWD; [ $tree = old2 ] && pp=$PWD/.scratch/s18/old2
  mkdir -p $OUT/ab
  PYTHONPATH=$pp timeout 50 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b --tokens 128 1024 --backends triton,triton_int4 --reps 50 --trials 3 --out $OUT/ab > $OUT/ab_$tree$i.log 2>&1
  echo "== $tree pass $i"; grep -E "^qwen3" $OUT/ab_$tree$i.log
done; done
cat $OUT/ab_*.log > $OUT/host_ab_launch.log; rm -rf $OUT/ab $OUT/ab_*.log
export PYTHONPATH=$PWD
run() { name=$1; shift; timeout 330 python -m pytest -m gpu -q -p no:cacheprovider "$@" > $OUT/gpu_tests_$name.txt 2>&1; echo "$name rc=$?" >> $OUT/rcs.txt; }
run a tests/test_launch.py tests/test_pdl.py tests/test_plan_kernel.py tests/test_backends.py &
run b tests/test_triton_int4_gemv.py &
run c tests/test_triton_int4.py &
run d tests/test_triton_grouped_gemm.py tests/test_hf.py tests/test_bench.py &
wait
cat $OUT/rcs.txt
for f in $OUT/gpu_tests_*.txt; do echo "== $f"; tail -n 1 $f; grep -E "^FAILED|^ERROR" $f | head -5; done

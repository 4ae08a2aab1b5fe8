#!/bin/bash
# session 18 call 3: eager host time, 3aedad2 (old) vs the GEMV schedule cache (new), then GPU tests of the new tree
export TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
specs="mixtral:1:triton_int4 qwen3-30b-a3b:1:triton_int4 qwen3-30b-a3b:4:triton_int4 qwen3-30b-a3b:128:triton_int4 qwen3-30b-a3b:1024:triton"
for tree in old new old new; do
  pp=$PWD; [ $tree = old ] && pp=$PWD/.scratch/s18/old
  echo "== $tree"; PYTHONPATH=$pp timeout 70 python .scratch/s18/gpu_host_profile.py $specs > $OUT/profile_$tree.log 2>&1
  grep -E "^micro|host .* per forward" $OUT/profile_$tree.log
done
for tree in old new; do
  pp=$PWD; [ $tree = old ] && pp=$PWD/.scratch/s18/old
  mkdir -p $OUT/ho_$tree
  PYTHONPATH=$pp timeout 80 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b mixtral --tokens 1 128 1024 --backends triton,triton_int4 --reps 30 --trials 3 --out $OUT/ho_$tree > $OUT/ho_$tree.log 2>&1; echo "== host_overhead $tree"; tail -n 13 $OUT/ho_$tree.log
done
export PYTHONPATH=$PWD
run() { name=$1; shift; timeout 280 python -m pytest -m gpu -q -p no:cacheprovider "$@" > $OUT/gpu_tests_$name.txt 2>&1; echo "$name rc=$?"; }
run gemv tests/test_triton_int4_gemv.py &
run int4 tests/test_triton_int4.py tests/test_launch.py &
run gg tests/test_triton_grouped_gemm.py &
wait
for f in $OUT/gpu_tests_*.txt; do echo "== $f"; tail -n 1 $f; grep -E "^FAILED|^ERROR" $f | head -5; done

#!/bin/bash
# session 18 call 6: eager host A/B of launch.py's fixed heuristics (old = e5ac4dd, new = 676ca44), processes alternating
export TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
for i in 1 2 3; do for tree in old2 new; do
  pp=$PWD; [ $tree = old2 ] && pp=$PWD/.scratch/s18/old2
  mkdir -p $OUT/ab
  PYTHONPATH=$pp timeout 40 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b --tokens 128 1024 --backends triton,triton_int4 --reps 50 --trials 3 --out $OUT/ab > $OUT/ab_$i$tree.log 2>&1
  echo "== $tree pass $i"; grep -E "^qwen3|Error" $OUT/ab_$i$tree.log
done; done
cat $OUT/ab_*.log > $OUT/host_ab_launch.log; rm -rf $OUT/ab $OUT/ab_*.log

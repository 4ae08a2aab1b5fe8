#!/bin/bash
# session 18 call 4: (1) eager host A/B 3aedad2 (old) vs 7de5415 (new), processes alternating, unchanged bf16 T=1 as the
# control in each; (2) issue 4's prefill ratio over 5 pairs at 7de5415
export TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(cat .scratch/s18/rev 2>/dev/null)
for i in 1 2 3; do for tree in old new; do
  pp=$PWD; [ $tree = old ] && pp=$PWD/.scratch/s18/old
  mkdir -p $OUT/ab_$tree$i
  PYTHONPATH=$pp timeout 45 python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b mixtral --tokens 1 --backends triton,triton_int4 --reps 50 --trials 3 --out $OUT/ab_$tree$i > $OUT/ab_$tree$i.log 2>&1
  echo "== $tree pass $i"; grep -E "^(qwen3|mixtral)" $OUT/ab_$tree$i.log
done; done
mkdir -p $OUT/keep; for f in $OUT/ab_*.log; do cat $f >> $OUT/keep/host_ab.log; done; rm -rf $OUT/ab_*
PYTHONPATH=$PWD timeout 250 python scripts/gpu_prefill_ratio.py --presets mixtral deepseek-v3 qwen3-30b-a3b --pairs 5 --out $OUT/keep > $OUT/keep/ratio.log 2>&1
grep -E "median|copy|ratio" $OUT/keep/ratio.log | tail -20

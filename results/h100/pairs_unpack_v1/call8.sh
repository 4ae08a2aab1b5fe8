#!/bin/bash
# session 16 call 8: cb9c225 on the GPU: int4 GPU tests, CLI at the regime boundary, mixtral prefill ratio
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=cb9c225
timeout 230 python -m pytest -q -m gpu tests/test_triton_int4.py > $OUT/gpu_tests_int4_cb9c225.txt 2>&1
tail -2 $OUT/gpu_tests_int4_cb9c225.txt
if grep -q failed $OUT/gpu_tests_int4_cb9c225.txt; then grep -E "Error|assert|FAILED" $OUT/gpu_tests_int4_cb9c225.txt | head -30; exit 1; fi
for P in mixtral deepseek-v3; do
  case $P in mixtral) TT="1 16 64 128 1024 8192";; deepseek-v3) TT="1 16 128 512 1024 8192";; esac
  timeout 150 python -m moe_tut.bench --config $P --tokens $TT --backends triton,triton_int4 --out $OUT/cli_$P > $OUT/cli_$P.log 2>&1
  grep -E "^$P " $OUT/cli_$P.log
done
timeout 150 python scripts/gpu_prefill_ratio.py --presets mixtral --pairs 5 --out $OUT > $OUT/ratio.log 2>&1
tail -8 $OUT/ratio.log

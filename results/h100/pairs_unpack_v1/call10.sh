#!/bin/bash
# session 16 call 10: Int4Variant 'korder' (prefill unpack in K order): GPU tests, A/B at prefill sizes
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=${REV:-0c7559b+korder}
timeout 150 python -m pytest -q -m gpu tests/test_triton_int4.py -k "k_order or mid_size or tail_split" > $OUT/gpu_tests_korder.txt 2>&1
tail -2 $OUT/gpu_tests_korder.txt
if grep -q failed $OUT/gpu_tests_korder.txt; then grep -E "Error|assert|FAILED" $OUT/gpu_tests_korder.txt | head -30; exit 1; fi
V=MOE_TUT_TRITON_INT4_VARIANT
S="--setting packed:$V=stack,packed --setting korder:$V=stack,packed,korder"
timeout 400 python scripts/gpu_env_ab.py $S --presets mixtral deepseek-v3 qwen3-30b-a3b --tokens 8192 1024 --backends triton_int4 --passes 3 --name korder > $OUT/ko.log 2>&1
grep -h "T=" $OUT/ko.log

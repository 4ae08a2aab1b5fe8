#!/bin/bash
# prefill tail split: GPU tests, then A/B at T=8192 (and 1024) against one launch per GEMM
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=f327c19
timeout 240 python -m pytest -q -m gpu tests/test_triton_int4.py -k "tail or mid_size or fp16_prefill or odd" > $OUT/gpu_tests_tail.txt 2>&1
tail -3 $OUT/gpu_tests_tail.txt
if grep -q failed $OUT/gpu_tests_tail.txt; then grep -E "Error|assert" $OUT/gpu_tests_tail.txt | head -20; exit 1; fi
S="--setting tail: --setting one:MOE_TUT_INT4_PREFILL_TAIL=0"
python scripts/gpu_env_ab.py $S --presets deepseek-v3 qwen3-30b-a3b --tokens 8192 --backends triton triton_int4 --passes 2 --name call9_tail_a > $OUT/ab9a.log 2>&1
grep -h "T=" $OUT/ab9a.log
python scripts/gpu_env_ab.py $S --presets mixtral glm-4.5 --tokens 8192 --backends triton triton_int4 --passes 2 --name call9_tail_b > $OUT/ab9b.log 2>&1
grep -h "T=" $OUT/ab9b.log
python scripts/gpu_env_ab.py $S --presets mixtral --tokens 1024 --backends triton_int4 --passes 2 --name call9_tail_c > $OUT/ab9c.log 2>&1
grep -h "T=" $OUT/ab9c.log

#!/bin/bash
# tail split for both backends: GPU tests, then A/B at T=8192 and 1024 against one launch per GEMM
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(git rev-parse --short HEAD)
timeout 200 python -m pytest -q -m gpu tests/test_triton_grouped_gemm.py tests/test_triton_int4.py -k "tail or mid_size" > $OUT/gpu_tests_tail2.txt 2>&1
tail -3 $OUT/gpu_tests_tail2.txt
if grep -q failed $OUT/gpu_tests_tail2.txt; then grep -E "Error|assert" $OUT/gpu_tests_tail2.txt | head -20; exit 1; fi
S="--setting tail: --setting one:MOE_TUT_PREFILL_TAIL=0"
python scripts/gpu_env_ab.py $S --presets deepseek-v3 mixtral --tokens 8192 --backends triton triton_int4 --passes 2 --name call10_tail_a > $OUT/ab10a.log 2>&1
grep -h "T=" $OUT/ab10a.log
python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b glm-4.5 deepseek --tokens 8192 --backends triton --passes 2 --name call10_tail_b > $OUT/ab10b.log 2>&1
grep -h "T=" $OUT/ab10b.log
python scripts/gpu_env_ab.py $S --presets mixtral --tokens 1024 --backends triton --passes 2 --name call10_tail_c > $OUT/ab10c.log 2>&1
grep -h "T=" $OUT/ab10c.log

#!/bin/bash
# words unpack: GPU bits tests, then A/B against the asm unpack
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=7ab80fd
timeout 200 python -m pytest -q -m gpu tests/test_triton_int4.py -k "words or register_cap" > $OUT/gpu_tests_words.txt 2>&1
tail -3 $OUT/gpu_tests_words.txt
if grep -q failed $OUT/gpu_tests_words.txt; then grep -E "Error|assert" $OUT/gpu_tests_words.txt | head -20; exit 1; fi
D="magic,post,split,asm,ppsm=64,gemv=4,gemvrows=1"
S="--setting asm: --setting words:MOE_TUT_TRITON_INT4_VARIANT=$D,words"
python scripts/gpu_env_ab.py $S --presets mixtral --tokens 8 16 32 --backends triton_int4 --passes 2 --name call7_words_mixtral > $OUT/ab7a.log 2>&1
python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b glm-4.5 --tokens 32 64 --backends triton_int4 --passes 2 --name call7_words_b > $OUT/ab7b.log 2>&1
python scripts/gpu_env_ab.py $S --presets deepseek-v3 --tokens 64 128 --backends triton_int4 --passes 2 --name call7_words_c > $OUT/ab7c.log 2>&1
grep -h "T=" $OUT/ab7a.log $OUT/ab7b.log $OUT/ab7c.log

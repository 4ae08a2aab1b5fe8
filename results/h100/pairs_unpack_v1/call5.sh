#!/bin/bash
# session 16 call 5: decode tile knobs and a GEMM1 register cap on top of the byte-pair unpack (d1a923f + temp env)
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=a3283d7+maxnreg1-env
C=MOE_TUT_TRITON_INT4_CONFIG
S="--setting default: --setting s3:$C=16,64,128,8,4,3 --setting s6:$C=16,64,128,8,4,6 --setting bn128:$C=16,128,128,8,4,4 --setting bn128w8:$C=16,128,128,8,8,4 --setting g1cap128:MOE_TUT_INT4_DECODE_MAXNREG1=128"
timeout 400 python scripts/gpu_env_ab.py $S --presets mixtral qwen3-30b-a3b glm-4.5 --tokens 16 32 --backends triton_int4 --passes 2 --name knobs > $OUT/knobs.log 2>&1
grep -h "T=" $OUT/knobs.log

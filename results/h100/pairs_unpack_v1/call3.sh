#!/bin/bash
# session 16 call 3: pairs under PDL: whole-forward PDL off, GEMM2 plain launch, vs quad
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=${REV:-aac532f+pairs+gemm2pdl-env}
D="magic,post,split,asm,ppsm=64,gemv=4,gemvrows=1"
S="--setting pairs: --setting pairs_g2plain:MOE_TUT_INT4_GEMM2_PDL=0 --setting pairs_nopdl:MOE_TUT_PDL=0 --setting quad:MOE_TUT_TRITON_INT4_VARIANT=$D"
python scripts/gpu_env_ab.py $S --presets mixtral --tokens 8 16 32 --backends triton_int4 --passes 2 --name pdl_mixtral > $OUT/ab_a.log 2>&1
grep -h "T=" $OUT/ab_a.log
python scripts/gpu_env_ab.py $S --presets qwen3-30b-a3b glm-4.5 deepseek-v3 --tokens 32 64 --backends triton_int4 --passes 2 --name pdl_b > $OUT/ab_b.log 2>&1
grep -h "T=" $OUT/ab_b.log

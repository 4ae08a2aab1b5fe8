#!/bin/bash
# session 16 call 2: why pairs is slower at mixtral T=16: registers, per-kernel breakdown; then bf16 box vs two
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=${REV:-aac532f+pairs}
D="magic,post,split,asm,ppsm=64,gemv=4,gemvrows=1"
timeout 150 python .scratch/s16/regs.py > $OUT/regs.txt 2>&1; cat $OUT/regs.txt | tail -20
for v in pairs quad; do
  if [ $v = quad ]; then export MOE_TUT_TRITON_INT4_VARIANT=$D; fi
  MOE_TUT_PDL=0 MOE_TUT_L2_FLUSH=read timeout 150 python scripts/gpu_decode_breakdown.py --presets mixtral --backends triton_int4 --tokens 8 16 32 --out $OUT/bd_$v > $OUT/bd_$v.log 2>&1
  tail -30 $OUT/bd_$v.log
done
unset MOE_TUT_TRITON_INT4_VARIANT
timeout 240 python scripts/gpu_env_ab.py --setting box:MOE_TUT_TRITON_GATE_UP=box --setting two:MOE_TUT_TRITON_GATE_UP=two --presets mixtral --tokens 8192 --backends triton --passes 6 --name box_two_mixtral > $OUT/box.log 2>&1
grep -h "T=" $OUT/box.log

#!/bin/bash
# ncu of mixtral T=16 INT4 decode: Triton tl.dot path vs cuda_int4
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0
S="smsp__average_warp_latency_issue_stalled"
M="${S}_long_scoreboard.ratio,${S}_wait.ratio,${S}_barrier.ratio,${S}_short_scoreboard.ratio,${S}_math_pipe_throttle.ratio,${S}_mio_throttle.ratio,${S}_lg_throttle.ratio,${S}_no_instruction.ratio,${S}_dispatch_stall.ratio,${S}_membar.ratio,${S}_selected.ratio,${S}_not_selected.ratio,dram__bytes_read.sum,smsp__inst_executed.sum,sm__cycles_active.avg"
SEC="--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats"
timeout 280 ncu --clock-control none $SEC --metrics $M -k regex:_moe_int4 --launch-skip 4 --launch-count 2 \
  python scripts/gpu_int4_profile_target.py --preset mixtral --tokens 16 --variant magic,post,split,asm,ppsm=64 --reps 3 > $OUT/ncu_t16_triton.txt 2>&1
timeout 200 ncu --clock-control none $SEC --metrics $M -k regex:gemm --launch-skip 4 --launch-count 2 \
  python scripts/gpu_cuda_int4_profile_target.py --preset mixtral --tokens 16 > $OUT/ncu_t16_cuda.txt 2>&1
for f in triton cuda; do echo "== $f"; grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Block Limit Reg|Grid Size|Issued Warp|No Eligible|Warp Cycles Per Issued|stalled_|inst_executed.sum|dram__bytes" $OUT/ncu_t16_$f.txt | head -70; done

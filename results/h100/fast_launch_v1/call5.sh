#!/bin/bash
# session 17 call 5: the remaining GPU tests with direct launches on; the CLI at the eager points
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 MOE_TUT_GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo wip)
timeout 280 python -m pytest -m gpu -q tests/test_triton_grouped_gemm.py "tests/test_triton_int4.py::test_gpu_forward_replays_in_a_cuda_graph" > $OUT/gpu_tests_rest.txt 2>&1; tail -4 $OUT/gpu_tests_rest.txt
timeout 170 python -m moe_tut.bench --config qwen3-30b-a3b --tokens 128 1024 --backends grouped_mm,triton,triton_int4 --out $OUT/qwen3 > $OUT/cli_qwen3.log 2>&1; tail -14 $OUT/cli_qwen3.log

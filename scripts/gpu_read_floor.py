#!/usr/bin/env python3
"""How fast can one kernel read N bytes at all? The floor a decode forward's weight streaming is held to.

    python scripts/gpu_read_floor.py [--mb 20 59 117 182 700] [--out DIR]
    python scripts/gpu_read_floor.py --smoke      # CPU, Triton interpreter: checks the stream kernel's sums only

For each size, one contiguous buffer is read by
  - `torch.sum` of a float32 buffer (one launch, every byte read once, 4 bytes written; random bits, so some values
    are NaN or Inf, which costs a GPU nothing), and
  - a plain Triton streaming kernel (_stream_sum: a grid of P programs per SM, each summing every P*SMs-th block
    of BLOCK words into one partial), in a few (BLOCK, warps, programs per SM) shapes: whether torch.sum's floor is
    the hardware's or torch's.
Each is timed as the harness times a decode forward: CUDA-graph replay, L2 made cold before each replay
(moe_tut.bench.timing, MOE_TUT_L2_FLUSH), median of CUDA events. The cuda_int4 sizes at T = 1 are 59 MB (mixtral's
two touched experts' w2, GEMM2), 117 MB (their w13, GEMM1) and 182 MB (both, one forward). Prints read GB/s and
its share of the device copy bandwidth (read + write) measured in the same run, and writes read_floor.csv under
--out or $OUT.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

# (BLOCK words of 4 bytes per load step, num_warps, programs per SM, contiguous)
STREAM_SHAPES = [(2048, 4, 8, False), (4096, 8, 4, False), (4096, 4, 8, False), (8192, 8, 4, False),
                 (2048, 4, 16, False), (2048, 4, 8, True), (4096, 8, 4, True)]


@triton.jit
def _stream_sum(x_ptr, part_ptr, n_blocks, programs, BLOCK: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """part[pid] = sum of this program's blocks of BLOCK float32 words (the buffer holds n_blocks whole blocks):
    blocks pid, pid + programs, ... (strided: the grid sweeps the buffer front to back together), or one
    contiguous run of about n_blocks / programs blocks (CONTIGUOUS: each program its own region)."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if CONTIGUOUS:
        per = tl.cdiv(n_blocks, programs)
        for b in tl.range(pid * per, tl.minimum(n_blocks, pid * per + per)):
            acc += tl.load(x_ptr + b * BLOCK + tl.arange(0, BLOCK))
    else:
        for b in tl.range(pid, n_blocks, programs):
            acc += tl.load(x_ptr + b * BLOCK + tl.arange(0, BLOCK))  # int32 offsets: buffers under 8 GB
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


def stream_sum(words: torch.Tensor, block: int, warps: int, programs: int, part: torch.Tensor,
               contiguous: bool = False) -> torch.Tensor:
    """Sum of words (float32, a multiple of block long) as per-program partials part[:programs]."""
    _stream_sum[(programs,)](words, part, words.numel() // block, programs, BLOCK=block, CONTIGUOUS=contiguous,
                             num_warps=warps)
    return part


def smoke() -> None:
    from moe_tut.env import use_interpreter_if_no_gpu

    use_interpreter_if_no_gpu()  # also patches the interpreter's scalar indexing, which the loop above needs
    words = torch.randn(64 * 256, generator=torch.Generator().manual_seed(0))
    for block, warps, programs, contiguous in [(256, 4, 3, False), (1024, 4, 16, False), (256, 4, 5, True)]:
        part = torch.zeros(programs)
        got = stream_sum(words, block, warps, programs, part, contiguous).double().sum().item()
        want = words.double().sum().item()
        assert abs(got - want) < 1e-3 * words.abs().sum().item(), (block, programs, got, want)
        print(f"stream_sum BLOCK={block} programs={programs}: {got:.4f} == torch {want:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", nargs="+", type=float, default=[20, 59, 117, 182, 700])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true", help="CPU: check the stream kernel's sums under the interpreter")
    args = ap.parse_args()
    if args.smoke:
        smoke()
        return
    from moe_tut.bench.ceilings import measure_ceilings
    from moe_tut.bench.results import write_csv
    from moe_tut.bench.timing import l2_flush_mode, time_cuda

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copy = measure_ceilings(dev).copy_gbps
    print(f"{torch.cuda.get_device_name(dev)}: device copy {copy:.0f} GB/s (read + write); "
          f"L2 flush {l2_flush_mode()!r}")
    part = torch.empty(16 * sms, dtype=torch.float32, device=dev)
    rows = []
    for mb in args.mb:
        n = int(mb * 1e6) // 4 // 8192 * 8192  # whole blocks for every shape
        words = torch.randint(0, 256, (4 * n,), dtype=torch.uint8, device=dev).view(torch.float32)
        variants = [("torch.sum", lambda w=words: w.sum())]
        for block, warps, per_sm, contiguous in STREAM_SHAPES:
            label = f"stream b{block} w{warps} p{per_sm}" + (" contiguous" if contiguous else "")
            variants.append((label, lambda w=words, b=block, nw=warps, p=per_sm * sms, c=contiguous:
                             stream_sum(w, b, nw, p, part, c)))
        # The same bytes as two dependent launches of 2/3 and 1/3 (GEMM1's and GEMM2's shares of a decode
        # forward's weights): what splitting one stream into two kernels costs.
        cut = n // 8192 * 2 // 3 * 8192
        for block, warps, per_sm, contiguous in STREAM_SHAPES[:1]:
            variants.append((f"two launches b{block} w{warps} p{per_sm}",
                             lambda w1=words[:cut], w2=words[cut:], b=block, nw=warps, p=per_sm * sms, c=contiguous:
                             (stream_sum(w1, b, nw, p, part, c), stream_sum(w2, b, nw, p, part, c))))
        for label, fn in variants:
            tm = time_cuda(fn, use_graph=True)
            gbps = 4 * n / (tm.median_ms * 1e-3) / 1e9
            rows.append(dict(MB=mb, kernel=label, median_us=round(tm.median_ms * 1e3, 1), read_GBps=round(gbps),
                             pct_of_copy=round(100 * gbps / copy, 1)))
            print(f"{mb:7.1f} MB  {label:24s} {tm.median_ms * 1e3:8.1f} us  {gbps:6.0f} GB/s  "
                  f"{100 * gbps / copy:5.1f}% of copy", flush=True)
    if args.out:
        print(f"wrote {write_csv(Path(args.out) / 'read_floor.csv', rows)}")


if __name__ == "__main__":
    main()

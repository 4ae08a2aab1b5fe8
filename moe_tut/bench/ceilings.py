"""The two ceilings every row is measured against, measured on this device in this run.

- dense bf16 GEMM rate (TFLOP/s): a large square matmul on random data (never zeros);
- device copy bandwidth (GB/s): a large device-to-device copy, counting bytes read + written.
Datasheet numbers are not ceilings; these are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .timing import time_call


@dataclass(frozen=True)
class Ceilings:
    gemm_tflops: float
    copy_gbps: float
    gemm_size: int
    copy_bytes: int
    device: str

    def roofline_ms(self, flops: float, bytes_moved: float) -> float:
        """max(FLOPs / GEMM rate, bytes / copy bandwidth), in ms."""
        return max(flops / (self.gemm_tflops * 1e12), bytes_moved / (self.copy_gbps * 1e9)) * 1e3

    def as_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: torch.device | str, gemm_size: int | None = None,
                     copy_bytes: int | None = None) -> Ceilings:
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    n = gemm_size or (8192 if on_gpu else 512)
    nbytes = copy_bytes or (2 * 1024**3 if on_gpu else 64 * 1024**2)
    gemm_ms = _time_gemm(n, device)
    return Ceilings(gemm_tflops=2 * n**3 / (gemm_ms * 1e-3) / 1e12, copy_gbps=measure_copy_gbps(device, nbytes),
                    gemm_size=n, copy_bytes=nbytes, device=str(device))


def _time_gemm(n: int, device: torch.device) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return time_call(lambda: torch.matmul(a, b, out=c), device).median_ms


def measure_copy_gbps(device: torch.device | str, nbytes: int) -> float:
    """Device copy bandwidth: bytes read + written by one device-to-device copy of `nbytes`, per second."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randint(0, 127, (nbytes,), device=device, dtype=torch.int8, generator=gen)
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), device).median_ms
    return 2 * nbytes / (copy_ms * 1e-3) / 1e9

"""Will it fit? Estimates made before allocating, so the answer is a message, not a CUDA OOM."""

from __future__ import annotations

import torch

from ..presets import MoEConfig

GB = 1e9
# Presets whose weights exceed this are refused on the CPU: a forward would take minutes and the
# numbers would say nothing about GPUs. debug (13 MB) and small custom shapes run.
CPU_WEIGHT_LIMIT_BYTES = 512 * 1024**2
# Memory the CUDA context, allocator fragmentation and cuBLAS workspaces take beyond our estimate.
GPU_HEADROOM_BYTES = 1.5 * GB


class InsufficientMemoryError(RuntimeError):
    """The requested run does not fit; the message says what was needed, what is free, what to do."""


def activation_bytes(cfg: MoEConfig, T: int) -> int:
    """x and y in bf16, routing tensors and the plan's index tensors."""
    return T * cfg.H * 2 * 2 + T * cfg.top_k * (8 + 4 + 4 * 4)


def free_bytes(device: torch.device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def check_fits(cfg: MoEConfig, tokens: list[int], device: torch.device, weight_bytes: int | None = None,
               extra_bytes: int = 0) -> None:
    """Raise InsufficientMemoryError if weights + activations (+ extra) for the largest T do not fit."""
    device = torch.device(device)
    weights = cfg.weight_bytes() if weight_bytes is None else weight_bytes
    if device.type != "cuda":
        if weights > CPU_WEIGHT_LIMIT_BYTES:
            raise InsufficientMemoryError(
                f"preset {cfg.name} has {weights / GB:.1f} GB of expert weights; there is no CUDA GPU here, and on "
                f"the CPU only small shapes run (up to {CPU_WEIGHT_LIMIT_BYTES / GB:.1f} GB). "
                "Use --config debug (or a small custom shape), or run on a GPU.")
        return
    need = weights + activation_bytes(cfg, max(tokens)) + extra_bytes + GPU_HEADROOM_BYTES
    free = free_bytes(device)
    if need > free:
        raise InsufficientMemoryError(
            f"preset {cfg.name} at T={max(tokens)} needs about {need / GB:.1f} GB on {device} "
            f"({weights / GB:.1f} GB of bf16 expert weights, the rest activations and workspace) but only "
            f"{free / GB:.1f} GB is free. Try a smaller T (--batch/--seq/--tokens), INT4 weights (about 4x "
            "smaller than bf16), or a smaller preset.")

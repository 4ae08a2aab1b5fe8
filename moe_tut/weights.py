"""Expert weights that know their own size.

Layout (Hugging Face / vLLM): w13 [E, 2F, H] holds W1 (gate, rows 0..F-1) and W3 (up, rows F..2F-1)
stacked; w2 [E, H, F]. Expert e computes  W2[e] @ (silu(W1[e] @ x) * (W3[e] @ x)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .presets import MoEConfig


class ExpertShapes:
    """Sizes and byte counts of stacked expert weights: w13 [E, 2F, H] and w2 [E, H, F] as tensors or as
    anything with a `.shape` and `.device` (INT4's QuantizedTensor), plus the subclass's `nbytes`."""

    w13: object
    w2: object

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def ffn_size(self) -> int:
        return self.w2.shape[2]

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def bytes_per_expert(self) -> int:
        return self.nbytes // self.num_experts

    def bytes_for(self, active_experts: int) -> int:
        """Bytes a forward must read when `active_experts` experts received at least one token."""
        return self.bytes_per_expert() * active_experts


@dataclass
class ExpertWeights(ExpertShapes):
    w13: torch.Tensor  # [E, 2F, H]
    w2: torch.Tensor  # [E, H, F]

    def __post_init__(self):
        if self.w13.dim() != 3 or self.w2.dim() != 3:
            raise ValueError(f"w13 must be [E, 2F, H] and w2 [E, H, F]; got {tuple(self.w13.shape)} "
                             f"and {tuple(self.w2.shape)}")
        E, two_f, H = self.w13.shape
        if two_f % 2:
            raise ValueError(f"w13's second dim must be 2F (gate and up stacked), got {two_f}")
        if tuple(self.w2.shape) != (E, H, two_f // 2):
            raise ValueError(f"w2 must be [E, H, F] = {(E, H, two_f // 2)} to match w13 {tuple(self.w13.shape)}, "
                             f"got {tuple(self.w2.shape)}")
        if self.w13.dtype != self.w2.dtype:
            raise TypeError(f"w13 is {self.w13.dtype} but w2 is {self.w2.dtype}")
        if self.w13.device != self.w2.device:
            raise ValueError(f"w13 is on {self.w13.device} but w2 on {self.w2.device}")

    @classmethod
    def random(cls, cfg: MoEConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> ExpertWeights:
        """Random weights at a realistic scale: std 1/sqrt(fan_in), so activations stay O(1).

        Drawn expert by expert straight into `dtype`, so no float32 copy of the whole tensor is made
        (glm5's bf16 weights alone are 54 GB).
        """
        gen = torch.Generator(device=device).manual_seed(seed)
        w13 = torch.empty(cfg.E, 2 * cfg.F, cfg.H, device=device, dtype=dtype)
        w2 = torch.empty(cfg.E, cfg.H, cfg.F, device=device, dtype=dtype)
        for e in range(cfg.E):
            w13[e].normal_(0.0, cfg.H ** -0.5, generator=gen)
            w2[e].normal_(0.0, cfg.F ** -0.5, generator=gen)
        return cls(w13, w2)

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def check_matches(self, cfg: MoEConfig) -> None:
        expect = (cfg.E, cfg.H, cfg.F)
        got = (self.num_experts, self.hidden_size, self.ffn_size)
        if expect != got:
            raise ValueError(f"weights have (E, H, F) = {got} but config {cfg.name} says {expect}")

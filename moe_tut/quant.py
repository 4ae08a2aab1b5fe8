"""INT4 weight quantisation in plain PyTorch: quantise, pack, unpack, dequantise (CPU or GPU).

This module is the specification of the 4-bit weight format that the INT4 kernels (Triton
`triton_int4`, CUDA `cuda_int4`) read. Whatever a kernel computes must equal `dequantize` here.

Scheme: round-to-nearest (RTN), one scale per group of `group_size` consecutive values along the
REDUCTION dimension K, i.e. the last dim of both expert tensors:

    w13 [E, 2F, H]   N = 2F output rows, K = H   (gate rows 0..F-1, up rows F..2F-1, each quantised alone)
    w2  [E, H,  F]   N = H  output rows, K = F

A tensor W [E, N, K] is stored as (G = group_size, k = 0..K-1, g = k // G):

    packed [E, N, K/2]  uint8     byte packed[e, n, j] holds codes of k = 2j (low nibble, bits 0..3)
                                  and k = 2j+1 (high nibble, bits 4..7)
    scales [E, K/G, N]  bfloat16  scales[e, g, n]
    zeros  [E, K/G, N]  bfloat16  zeros[e, g, n]  (asymmetric only; None when symmetric)

and every value dequantises as (one formula for both modes; c = the 4-bit code 0..15)

    symmetric   W[e, n, k] = (c - 8) * scales[e, g, n]          c - 8 in [-8, 7] (offset binary)
    asymmetric  W[e, n, k] = c * scales[e, g, n] + zeros[e, g, n]

computed in float32 and rounded once to the activation dtype (bf16). Symmetric is the special case
zeros = -8 * scales, so a kernel can use one code path: w = fma(c, s, z) in float32, then cast.
In float32 (c - 8) * s and c * s + (-8 s) are exact (a 4-bit integer times an 8-bit-mantissa scale),
so both forms give identical bits; a kernel that instead multiplies in bf16 rounds twice and can
differ from this spec in the last bit.

Why this layout (for a kernel whose inner loop walks K in BLOCK_K tiles):

- packed keeps the bf16 weights' [E, N, K] orientation with K halved. A weight tile is the same
  pointer arithmetic as the bf16 kernel's [BLOCK_K, BLOCK_N] tile (offs_k[:, None] * stride_k +
  offs_n[None, :] * stride_n), with bytes instead of elements: the [BLOCK_K/2, BLOCK_N] byte tile
  reads, for each column n, BLOCK_K/2 contiguous bytes (32 B = one full DRAM sector at BLOCK_K = 64).
  The dequantised weights have the original layout, so the same reference code checks both.
- Packing along K (even k low, odd k high) means a byte never spans two output rows or two groups
  (G is even), and a kernel either interleaves the nibbles back
  (tl.join(lo, hi) [BLOCK_K/2, BLOCK_N, 2] -> permute (0, 2, 1) -> reshape to [BLOCK_K, BLOCK_N]) or
  skips the interleave by splitting the activations instead: dot(x[:, 0::2], lo) + dot(x[:, 1::2], hi).
- scales (and zeros) are [E, K/G, N], N fastest: one K tile (BLOCK_K dividing G) needs one scale per
  output column, scales[e, g, n0:n0+BLOCK_N], which is one contiguous run (256 B for BLOCK_N = 128),
  so the load is coalesced. In [E, N, K/G] order those BLOCK_N scales would sit K/G elements apart
  (80 B apart for H = 5120, G = 128): one 32 B sector per scale. (Marlin and GPTQ also store
  scales as [K/G, N].)
- bfloat16 scales and zeros, not float16: they have the bf16 weights' exponent range, so no scale
  over- or underflows (float16 underflows below 6e-5 and overflows above 65504), and any bf16 weight
  value is representable as a zero (the group's minimum), which makes asymmetric mode exact on
  constant groups. bf16's 8-bit mantissa costs at most 2^-9 relative error per group scale, far
  below the 4-bit rounding error (measured on Gaussian weights at G = 128: 11.7% relative Frobenius
  error symmetric, 10.0% asymmetric; quantization_error computes it for any weights).

Modes:

- symmetric (default): scale = absmax / 7 (rounded to nearest bf16), code c = round(w / scale) + 8.
  Only codes 1..15 (levels -7..7) occur, so no value is clipped and |w - deq| <= scale / 2;
  code 0 (level -8) is never produced but dequantises correctly if present.
  Using 16 levels with scale = absmax / 8 would shrink the step by 12.5% but clip the +absmax side
  by up to a full step.
- asymmetric: zero = the group minimum rounded DOWN to bf16, scale = (max - zero) / 15 (rounded to
  nearest), c = round((w - zero) / scale). Rounding the zero down keeps every value at or above
  level 0, and (max - zero) / scale <= 15 * (1 + 2^-8) < 15.5, so again nothing is clipped and
  |w - deq| <= scale / 2. The zero point is stored as a float offset (the value code 0 decodes to),
  not as a 4-bit integer: it costs 2 B per group instead of 0.5 B, but makes constant groups and
  groups of 16 evenly spaced values round-trip exactly, and decoding is one fma, same as symmetric.

Rounding is torch.round (half to even). An all-zero group (symmetric) or a constant group
(asymmetric) gets scale 0 and dequantises exactly to its value, never NaN.

Sizes (bytes per weight value): 0.5 for the codes plus 2 / G for scales (symmetric) or 4 / G for
scales and zeros (asymmetric). At G = 128 that is 0.516 B (4.125 bits): 3.88x smaller than bf16,
7.76x smaller than fp32; glm5's 53.9 GB of bf16 expert weights become 13.9 GB (asymmetric: 0.531 B,
3.76x vs bf16, 14.3 GB).

Memory while quantising: the work runs in chunks of whole rows of one expert (at most
QUANT_CHUNK_VALUES = 2^26 values, so a few float32 temporaries of 256 MB each), so glm5-size weights
(128 experts x 3 x 5120 x 13696) quantise on the GPU that holds them, without a float32 copy of the
whole tensor; dequantize is chunked the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .presets import MoEConfig
from .reference import expert_ffn_fp32
from .weights import ExpertShapes, ExpertWeights

DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.bfloat16  # why bf16 and not fp16: see the module docstring
# Values per quantise/dequantise step: 2^26 values = 256 MB per float32 temporary (two or three live).
QUANT_CHUNK_VALUES = 1 << 26
# Bytes per value of formats a compression ratio can be quoted against.
BASELINE_BYTES_PER_VALUE = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}

_SYM_OFFSET = 8  # symmetric level q in [-8, 7] is stored as the code q + 8
_SYM_MAX_LEVEL = 7  # absmax maps to level +-7, so no value is clipped (see docstring)
_ASYM_MAX_CODE = 15


# ----------------------------------------------------------------------------------- packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (integers 0..15) -> bytes [..., K/2] uint8; low nibble = even k, high = odd k."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"pack_int4 needs a tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 needs integer codes 0..15, got dtype {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 packs pairs along the last dim, which must be even; got shape {tuple(q.shape)}")
    if q.numel() and (q.min().item() < 0 or q.max().item() > 15):
        raise ValueError(f"pack_int4 codes must be in 0..15, got values in [{q.min().item()}, {q.max().item()}]")
    return _pack(q)


def _pack(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] uint8 -> codes [..., K] uint8 in 0..15 (inverse of pack_int4)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 needs a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.dim() == 0:
        raise ValueError("unpack_int4 needs at least one dim")
    # stack puts each byte's (low, high) pair side by side; flattening them restores k = 2j, 2j+1.
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------ the format


@dataclass
class QuantizedTensor:
    """A float tensor [E, N, K] in the INT4 format of the module docstring.

    packed [E, N, K/2] uint8; scales [E, K/G, N] bf16; zeros [E, K/G, N] bf16 or None (symmetric).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    symmetric: bool
    shape: tuple[int, int, int]

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be [E, N, K], got {self.shape}")
        E, N, K = self.shape
        G = self.group_size
        if G <= 0 or K % G or G % 2:
            raise ValueError(f"group_size {G} must be even and divide K={K}")
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != (E, N, K // 2):
            raise ValueError(f"packed must be uint8 {(E, N, K // 2)}, got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        if tuple(self.scales.shape) != (E, K // G, N):
            raise ValueError(f"scales must be [E, K/G, N] = {(E, K // G, N)}, got {tuple(self.scales.shape)}")
        if self.symmetric != (self.zeros is None):
            raise ValueError("zeros must be None for symmetric quantisation and a tensor for asymmetric")
        if self.zeros is not None and tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise ValueError(f"zeros must be shaped like scales {tuple(self.scales.shape)}, got "
                             f"{tuple(self.zeros.shape)}")

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        E, N, K = self.shape
        return E * N * K

    @property
    def nbytes(self) -> int:
        """Everything a kernel reads: packed codes, scales and zeros."""
        n = self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            n += self.zeros.numel() * self.zeros.element_size()
        return n

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self, dtype)


def check_quantizable(w: torch.Tensor, group_size: int, name: str = "w", dim_name: str = "K") -> None:
    """Clear errors for a tensor the format cannot hold, raised before any work is done."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor to quantise, got dtype {w.dtype}")
    if w.dim() != 3:
        raise ValueError(f"{name} must be 3-D [E, N, K] (K = reduction dim), got shape {tuple(w.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if group_size % 2:
        raise ValueError(f"group_size must be even (a byte's two values must share a group), got {group_size}")
    K = w.shape[-1]
    if K == 0:
        raise ValueError(f"{name}'s reduction dim {dim_name} is 0; there is nothing to quantise ({name} is "
                         f"{tuple(w.shape)})")
    if K % 2:
        raise ValueError(f"{name}'s reduction dim {dim_name}={K} is odd; two 4-bit values are packed per byte "
                         f"along it, so it must be even ({name} is {tuple(w.shape)})")
    if K % group_size:
        raise ValueError(f"group_size={group_size} does not divide {name}'s reduction dim {dim_name}={K} "
                         f"({name} is {tuple(w.shape)}); pick a group size that divides {K}")


def _row_chunks(E: int, N: int, K: int) -> Iterator[tuple[int, int, int]]:
    """(expert, first row, end row) blocks of at most QUANT_CHUNK_VALUES values, never spanning experts."""
    rows = max(1, QUANT_CHUNK_VALUES // max(K, 1))
    for e in range(E):
        for n0 in range(0, N, rows):
            yield e, n0, min(N, n0 + rows)


def _round_down_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the largest bfloat16 <= x (round toward -inf), by stepping the bit pattern.

    Bit arithmetic rather than torch.nextafter, whose CUDA kernel lacks bf16 in older PyTorch builds.
    bf16 is sign-magnitude: one step down is bits - 1 for positive values and bits + 1 (larger
    magnitude) for negative ones, -0.0 included.
    """
    y = x.to(torch.bfloat16)
    too_big = y.float() > x
    bits = y.view(torch.int16)
    down = torch.where(torch.signbit(y), bits + 1, bits - 1).view(torch.bfloat16)
    return torch.where(too_big, down, y)


def _quantize_rows(w: torch.Tensor, G: int, symmetric: bool):
    """w [r, K] -> packed [r, K/2], scales [K/G, r], zeros [K/G, r] or None, and a non-finite flag."""
    r, K = w.shape
    x = w.float().view(r, K // G, G)
    if symmetric:
        scales = (x.abs().amax(dim=-1) / _SYM_MAX_LEVEL).to(SCALE_DTYPE)
        zeros = None
        shifted = x
        lo, hi = -_SYM_OFFSET, _SYM_OFFSET - 1
    else:
        zeros = _round_down_bf16(x.amin(dim=-1))
        shifted = x - zeros.float()[..., None]
        scales = (shifted.amax(dim=-1) / _ASYM_MAX_CODE).to(SCALE_DTYPE)
        lo, hi = 0, _ASYM_MAX_CODE
    s = scales.float()
    # A group with range 0 gets scale 0; dividing by 1 there gives code 0 (level 0), not 0/0 = NaN.
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = (shifted / safe[..., None]).round_().clamp_(lo, hi)  # in place: one float32 temporary fewer
    if symmetric:
        q += _SYM_OFFSET
    packed = _pack(q.view(r, K))
    bad = ~torch.isfinite(s).all()
    if zeros is not None:
        bad |= ~torch.isfinite(zeros).all()
    return packed, scales.t(), None if zeros is None else zeros.t(), bad


def quantize(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> QuantizedTensor:
    """Float [E, N, K] -> QuantizedTensor, group-wise along K (the last dim), on w's device.

    Runs in row chunks of one expert at a time (QUANT_CHUNK_VALUES), so no float32 copy of the
    whole tensor is made.
    """
    check_quantizable(w, group_size)
    E, N, K = w.shape
    G = group_size
    packed = torch.empty(E, N, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(E, K // G, N, dtype=SCALE_DTYPE, device=w.device)
    zeros = None if symmetric else torch.empty_like(scales)
    # One flag on the device, read once at the end, so a GPU run does not sync per chunk.
    bad = torch.zeros((), dtype=torch.bool, device=w.device)
    for e, n0, n1 in _row_chunks(E, N, K):
        p, s, z, b = _quantize_rows(w[e, n0:n1], G, symmetric)
        packed[e, n0:n1] = p
        scales[e, :, n0:n1] = s
        if zeros is not None:
            zeros[e, :, n0:n1] = z
        bad |= b
    if bad.item():
        raise ValueError("quantize produced a non-finite scale or zero: the weights contain NaN/Inf, or a "
                         "group's range overflows float32")
    return QuantizedTensor(packed, scales, zeros, G, symmetric, (E, N, K))


def _dequantize_rows(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, G: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """packed [r, K/2], scales/zeros [K/G, r] -> [r, K] in dtype: c * s + z in float32, one rounding."""
    r = packed.shape[0]
    K = 2 * packed.shape[1]
    c = unpack_int4(packed).float().view(r, K // G, G)
    s = scales.t().float()[..., None]
    z = -_SYM_OFFSET * s if zeros is None else zeros.t().float()[..., None]
    return c.mul_(s).add_(z).view(r, K).to(dtype)  # c * s is exact, so this equals fma(c, s, z)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """QuantizedTensor -> [E, N, K] in dtype: exactly the values an INT4 kernel multiplies with when
    dtype is its activation dtype (bf16). Chunked like quantize."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"dequantize needs a QuantizedTensor, got {type(qt).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize needs a floating-point dtype, got {dtype}")
    E, N, K = qt.shape
    out = torch.empty(qt.shape, dtype=dtype, device=qt.device)
    for e, n0, n1 in _row_chunks(E, N, K):
        z = None if qt.zeros is None else qt.zeros[e, :, n0:n1]
        out[e, n0:n1] = _dequantize_rows(qt.packed[e, n0:n1], qt.scales[e, :, n0:n1], z, qt.group_size, dtype)
    return out


# --------------------------------------------------------------------------- expert weights


def _baseline_bytes(baseline: str | float) -> float:
    if isinstance(baseline, str):
        if baseline not in BASELINE_BYTES_PER_VALUE:
            raise ValueError(f"unknown baseline {baseline!r}; use one of {sorted(BASELINE_BYTES_PER_VALUE)} "
                             "or a number of bytes per value")
        return BASELINE_BYTES_PER_VALUE[baseline]
    if isinstance(baseline, bool) or not isinstance(baseline, int | float) or baseline <= 0:
        raise ValueError(f"baseline must be a format name or a positive number of bytes per value, got {baseline!r}")
    return float(baseline)


@dataclass
class Int4ExpertWeights(ExpertShapes):
    """Expert weights in the INT4 format: w13 (of [E, 2F, H]) and w2 (of [E, H, F]) as QuantizedTensors.

    The drop-in counterpart of ExpertWeights for INT4 backends: same size properties, `nbytes` counts
    packed codes + scales + zeros, and `dequantize()` gives the ExpertWeights (in `dtype`, the
    activation dtype, bf16 by default) holding exactly the values a kernel computes with.
    """

    w13: QuantizedTensor
    w2: QuantizedTensor
    dtype: torch.dtype = torch.bfloat16  # activation dtype, and the dtype weights dequantise to

    def __post_init__(self):
        E, two_f, H = self.w13.shape
        if two_f % 2:
            raise ValueError(f"w13's second dim must be 2F (gate and up stacked), got {two_f}")
        if self.w2.shape != (E, H, two_f // 2):
            raise ValueError(f"w2 must be [E, H, F] = {(E, H, two_f // 2)} to match w13 {self.w13.shape}, "
                             f"got {self.w2.shape}")
        if self.w13.device != self.w2.device:
            raise ValueError(f"w13 is on {self.w13.device} but w2 on {self.w2.device}")
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype is the activation dtype and must be floating point, got {self.dtype}")

    @classmethod
    def from_bf16(cls, weights: ExpertWeights, group_size: int = DEFAULT_GROUP_SIZE,
                  symmetric: bool = True) -> Int4ExpertWeights:
        """Quantise ExpertWeights (bf16, or any float dtype, which becomes `dtype`) on their device."""
        if not isinstance(weights, ExpertWeights):
            raise TypeError(f"from_bf16 needs ExpertWeights, got {type(weights).__name__}")
        # Both checks first, so a bad group size for w2 fails before w13 is quantised.
        check_quantizable(weights.w13, group_size, "w13", "H")
        check_quantizable(weights.w2, group_size, "w2", "F")
        return cls(quantize(weights.w13, group_size, symmetric), quantize(weights.w2, group_size, symmetric),
                   weights.dtype)

    @property
    def group_size(self) -> int:
        return self.w13.group_size

    @property
    def symmetric(self) -> bool:
        return self.w13.symmetric

    @property
    def num_values(self) -> int:
        """Weight values represented: E * 3 * H * F."""
        return self.w13.numel + self.w2.numel

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    @property
    def bytes_per_value(self) -> float:
        return self.nbytes / self.num_values

    def compression_vs(self, baseline: str | float = "bf16") -> float:
        """How many times smaller than the same weights in `baseline` ('bf16', 'fp32', ... or bytes/value)."""
        return _baseline_bytes(baseline) * self.num_values / self.nbytes

    def describe_compression(self) -> str:
        """One line for docs and the CLI, naming both baselines."""
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"INT4 {kind}, group size {self.group_size}: {8 * self.bytes_per_value:.3f} bits per weight, "
                f"{self.compression_vs('bf16'):.2f}x smaller than bf16 ({self.compression_vs('fp32'):.2f}x vs fp32)")

    def dequantize(self) -> ExpertWeights:
        return ExpertWeights(dequantize(self.w13, self.dtype), dequantize(self.w2, self.dtype))

    def check_matches(self, cfg: MoEConfig) -> None:
        expect = (cfg.E, cfg.H, cfg.F)
        got = (self.num_experts, self.hidden_size, self.ffn_size)
        if expect != got:
            raise ValueError(f"weights have (E, H, F) = {got} but config {cfg.name} says {expect}")


def quantization_error(weights: ExpertWeights, group_size: int = DEFAULT_GROUP_SIZE,
                       symmetric: bool = True) -> dict[str, float]:
    """Relative Frobenius error ||deq - w||_F / ||w||_F of w13, w2 and both together ('total').

    deq is dequantised to the weights' dtype, i.e. the values a kernel computes with. One expert at a
    time, so only one expert's float32 copy exists at once; sums in float64.
    """
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"quantization_error needs ExpertWeights, got {type(weights).__name__}")
    check_quantizable(weights.w13, group_size, "w13", "H")
    check_quantizable(weights.w2, group_size, "w2", "F")
    sums = {}
    for name, w in (("w13", weights.w13), ("w2", weights.w2)):
        diff2 = torch.zeros((), dtype=torch.float64, device=w.device)
        ref2 = torch.zeros_like(diff2)
        for e in range(w.shape[0]):
            ref = w[e:e + 1].float()
            deq = dequantize(quantize(w[e:e + 1], group_size, symmetric), w.dtype).float()
            diff2 += (deq - ref).square().sum(dtype=torch.float64)
            ref2 += ref.square().sum(dtype=torch.float64)
        sums[name] = (diff2.item(), ref2.item())

    def rel(d2: float, r2: float) -> float:
        return (d2 / r2) ** 0.5 if r2 > 0 else d2 ** 0.5

    out = {name: rel(*s) for name, s in sums.items()}
    out["total"] = rel(sums["w13"][0] + sums["w2"][0], sums["w13"][1] + sums["w2"][1])
    return out


def expert_slice(qt: QuantizedTensor, e: int) -> QuantizedTensor:
    z = None if qt.zeros is None else qt.zeros[e:e + 1]
    return QuantizedTensor(qt.packed[e:e + 1], qt.scales[e:e + 1], z, qt.group_size, qt.symmetric,
                           (1, *qt.shape[1:]))


@torch.no_grad()
def int4_moe_reference(x: torch.Tensor, weights, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: what moe_forward_triton_int4 computes, in float32 (returns float32 [T, H]).

    Equal to moe_reference(x, weights.dequantize(), topk_ids, topk_weights), but dequantises one
    touched expert at a time, so it also runs where the whole dequantised model would not fit.
    """
    T, H = x.shape
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 for the ground truth
    try:
        for e in torch.unique(topk_ids).tolist():
            tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
            w13 = dequantize(expert_slice(weights.w13, e), weights.dtype)[0]
            w2 = dequantize(expert_slice(weights.w2, e), weights.dtype)[0]
            out = expert_ffn_fp32(x[tok], w13, w2)
            y.index_add_(0, tok, out * topk_weights[tok, slot].float()[:, None])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return y

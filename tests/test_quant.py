"""INT4 format (moe_tut/quant.py): packing layout by hand, round-trip bounds, exact cases, bytes, errors."""

import pytest
import torch

import moe_tut.quant as quant
from moe_tut.presets import custom
from moe_tut.quant import (
    Int4ExpertWeights,
    QuantizedTensor,
    dequantize,
    pack_int4,
    quantization_error,
    quantize,
    unpack_int4,
)
from moe_tut.reference import relative_error
from moe_tut.weights import ExpertWeights

BF16 = torch.bfloat16


def _groups(t: torch.Tensor, G: int) -> torch.Tensor:
    """[E, N, K] -> [E, N, K/G, G]."""
    E, N, K = t.shape
    return t.reshape(E, N, K // G, G)


def _per_value(stat: torch.Tensor, G: int) -> torch.Tensor:
    """scales/zeros [E, K/G, N] -> [E, N, K/G, 1], to broadcast against _groups(w)."""
    return stat.float().transpose(1, 2)[..., None]


# ------------------------------------------------------------------------------------ packing


def test_pack_layout_by_hand():
    # Low nibble = even k, high nibble = odd k; rows stay rows.
    q = torch.tensor([[[1, 2, 3, 4], [15, 0, 0, 15]]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[[0x21, 0x43], [0x0F, 0xF0]]]
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("shape", [(6,), (3, 10), (2, 5, 16), (2, 3, 4, 2)], ids=lambda s: "x".join(map(str, s)))
def test_pack_unpack_inverse_on_random_codes(shape):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, shape, generator=gen, dtype=torch.int64)  # any integer dtype is accepted
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


def test_unpack_pack_inverse_on_every_byte():
    every_byte = torch.arange(256, dtype=torch.uint8).view(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


# ------------------------------------------------------------------------- hand-checked quantise


def test_symmetric_1x1x8_by_hand():
    # absmax 3.5 -> scale 3.5 / 7 = 0.5; levels w / 0.5; 1.75 / 0.5 = 3.5 is a tie, rounded half to even -> 4.
    w = torch.tensor([[[0.0, 0.5, -0.5, 1.0, -1.0, 3.5, -3.5, 1.75]]], dtype=BF16)
    qt = quantize(w, group_size=8, symmetric=True)
    # codes = level + 8: [8, 9, 7, 10, 6, 15, 1, 12]; bytes = even | odd << 4
    assert qt.packed.tolist() == [[[0x98, 0xA7, 0xF6, 0xC1]]]
    assert qt.scales.dtype == BF16 and qt.scales.tolist() == [[[0.5]]]
    assert qt.zeros is None
    assert dequantize(qt).tolist() == [[[0.0, 0.5, -0.5, 1.0, -1.0, 3.5, -3.5, 2.0]]]


def test_asymmetric_1x1x8_by_hand():
    # min -1 -> zero -1; (6.5 - -1) / 15 = 0.5 -> scale 0.5; codes (w + 1) / 0.5.
    w = torch.tensor([[[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 6.5]]], dtype=BF16)
    qt = quantize(w, group_size=8, symmetric=False)
    # codes [0, 1, 2, 3, 4, 5, 6, 15]
    assert qt.packed.tolist() == [[[0x10, 0x32, 0x54, 0xF6]]]
    assert qt.scales.tolist() == [[[0.5]]] and qt.zeros.tolist() == [[[-1.0]]]
    assert torch.equal(dequantize(qt), w)


def test_scales_layout_is_groups_by_rows():
    # 1 expert, N=2 rows, K=8, G=4: scales[e, g, n] (N fastest), one per (row, group of 4 along K).
    w = torch.tensor([[[7, 0, 0, 0, 14, 0, 0, 0],
                       [0, 0, 0, 0.7, 0, 0, 0, -1.4]]], dtype=torch.float32)
    qt = quantize(w, group_size=4, symmetric=True)
    assert qt.scales.shape == (1, 2, 2)
    expect = torch.tensor([[[1.0, 0.1], [2.0, 0.2]]]).to(BF16)  # [g][n]: absmax / 7
    assert torch.equal(qt.scales, expect)
    # rows 0 and 1 of packed are the two weight rows; the 7 is code 15 in the low nibble of byte 0
    assert qt.packed[0, 0, 0].item() == 0x8F and qt.packed[0, 1, 1].item() == 0xF8
    assert qt.packed[0, 1, 3].item() == 0x18  # -1.4 / 0.2 = level -7 -> code 1, high nibble (k = 7)
    qa = quantize(w, group_size=4, symmetric=False)
    assert qa.zeros.shape == (1, 2, 2)
    assert qa.zeros[0, 0].tolist() == [0.0, 0.0] and qa.zeros[0, 1, 0].item() == 0.0  # [g][n]: group minima
    # -1.4 is not a bf16 value: the zero is the largest bf16 at or below it, one bf16 step (2^-7) away at most
    z = qa.zeros[0, 1, 1].item()
    assert z <= w[0, 1, 7].item() < z + 2 ** -7


# --------------------------------------------------------------------------------- round trip

ROUND_TRIP_CASES = [
    # (E, N, K, G, dtype); comments say what each covers
    (2, 8, 64, 16, BF16),
    (3, 5, 256, 128, BF16),  # odd N and E, two groups per row
    (1, 4, 96, 32, torch.float32),  # float32 input: the asymmetric zero must round down to bf16
    (2, 3, 40, 8, torch.float16),
    (1, 2, 128, 128, BF16),  # one group per row (per-channel)
]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("E,N,K,G,dtype", ROUND_TRIP_CASES,
                         ids=[f"E{c[0]}-N{c[1]}-K{c[2]}-G{c[3]}-{str(c[4])[6:]}" for c in ROUND_TRIP_CASES])
def test_round_trip_within_half_a_step(E, N, K, G, dtype, symmetric):
    gen = torch.Generator().manual_seed(1)
    # Heavy-ish tails and a per-row scale spread, so groups have very different ranges.
    w = (torch.randn(E, N, K, generator=gen) ** 3 * torch.rand(E, N, 1, generator=gen) * 4).to(dtype)
    qt = quantize(w, group_size=G, symmetric=symmetric)
    assert qt.packed.shape == (E, N, K // 2) and qt.scales.shape == (E, K // G, N)
    scale = _per_value(qt.scales, G)
    wf = _groups(w.float(), G)
    err32 = (_groups(dequantize(qt, torch.float32), G) - wf).abs()
    # float32 output: only the 4-bit rounding, at most half a step (+ float32 arithmetic slack)
    assert (err32 <= scale / 2 * (1 + 1e-5) + 1e-30).all(), (err32 - scale / 2).max()
    if not symmetric:
        assert (_per_value(qt.zeros, G) <= wf.amin(-1, keepdim=True)).all()  # the zero never clips
    # bf16 output adds one rounding of the result, half a bf16 ulp = 2^-9 relative
    err16 = (_groups(dequantize(qt, BF16).float(), G) - wf).abs()
    assert (err16 <= scale / 2 * (1 + 1e-5) + wf.abs() * 2 ** -8).all()
    # and the step is as small as the mode allows: absmax / 7, or range / 15
    span = wf.abs().amax(-1, keepdim=True) / 7 if symmetric else (wf.amax(-1, keepdim=True)
                                                                   - wf.amin(-1, keepdim=True)) / 15
    assert torch.allclose(scale, span, rtol=2 ** -7, atol=0)


def test_chunking_does_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 10, 64, generator=gen).to(BF16)
    for symmetric in (True, False):
        whole = quantize(w, 16, symmetric)
        monkeypatch.setattr(quant, "QUANT_CHUNK_VALUES", 3 * 64)  # 3 rows per chunk: chunks of 3, 3, 3, 1
        chunked = quantize(w, 16, symmetric)
        monkeypatch.undo()
        assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.scales, chunked.scales)
        assert symmetric or torch.equal(whole.zeros, chunked.zeros)
        monkeypatch.setattr(quant, "QUANT_CHUNK_VALUES", 64)  # one row per chunk
        assert torch.equal(dequantize(whole), dequantize(chunked))
        monkeypatch.undo()


def test_asymmetric_zero_rounds_down_to_bf16():
    # The zero must sit at or below the group minimum, or values below it would be clipped to code 0.
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(1000, generator=gen) * 10.0 ** torch.randint(-40, 30, (1000,), generator=gen),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, -1e-42, 1e-42, -1.001, 3.3])])
    down = quant._round_down_bf16(x)
    assert down.dtype == BF16
    assert (down.float() <= x).all()
    # and it is the largest such bf16: the next bf16 up is above x
    assert (torch.nextafter(down, torch.tensor(float("inf"), dtype=BF16)).float() > x).all()


# ------------------------------------------------------------------------------------ exact cases


@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 3.0e30, -1.0e-30, 0.0123], ids=lambda v: f"c{v:g}")
def test_asymmetric_exact_on_constant_groups(value):
    w = torch.full((1, 2, 16), value, dtype=BF16)
    w[0, 1, 8:] = -value / 2  # second group of row 1 is a different constant
    qt = quantize(w, group_size=8, symmetric=False)
    assert (qt.scales == 0).all()
    assert torch.equal(dequantize(qt), w)


@pytest.mark.parametrize("lo,step", [(-1.25, 0.1875), (0.0, 1.0), (-1024.0, 8.0), (0.5, 2 ** -8)],
                         ids=lambda v: f"{v:g}")
def test_asymmetric_exact_on_16_evenly_spaced_levels(lo, step):
    gen = torch.Generator().manual_seed(3)
    levels = lo + step * torch.arange(16, dtype=torch.float64)
    w = levels[torch.randperm(16, generator=gen)].to(BF16).view(1, 1, 16)
    assert torch.equal(w.double().sort(-1).values.flatten(), levels)  # the levels are exact in bf16
    qt = quantize(w, group_size=16, symmetric=False)
    assert qt.scales.item() == step and qt.zeros.item() == lo
    assert torch.equal(dequantize(qt), w)
    assert torch.equal(unpack_int4(qt.packed).float(), (w.float() - lo) / step)  # codes are the level index


def test_symmetric_exact_on_its_15_levels():
    step = 0.046875  # 3/64: exact in bf16, as are all its multiples up to 7
    w = (step * torch.arange(-7, 8, dtype=torch.float32)).repeat(2)[:16].to(BF16).view(1, 1, 16)
    qt = quantize(w, group_size=16, symmetric=True)
    assert qt.scales.item() == step
    assert torch.equal(dequantize(qt), w)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_all_zero_group(symmetric):
    w = torch.tensor([[[0.0] * 8 + [0.25, -0.5, 1.0, 0.75, 0.0, 0.5, -1.75, 2.0]]], dtype=BF16)
    qt = quantize(w, group_size=8, symmetric=symmetric)
    assert qt.scales[0, 0, 0].item() == 0.0
    # level 0: code 8 when symmetric (offset binary), code 0 when asymmetric (zero = the group's 0.0)
    assert unpack_int4(qt.packed)[0, 0, :8].tolist() == [8 if symmetric else 0] * 8
    deq = dequantize(qt)
    assert torch.isfinite(deq).all()
    assert (deq[0, 0, :8] == 0).all()
    # the neighbouring group is quantised on its own: within half its step, and exact in asymmetric
    # mode (multiples of 0.25 from -1.75 to 2.0: 16 levels, step 0.25)
    step = qt.scales[0, 1, 0].item()
    assert step == pytest.approx(2.0 / 7 if symmetric else 0.25, rel=2 ** -8)  # absmax / 7, or range / 15
    assert (deq[0, 0, 8:].float() - w[0, 0, 8:].float()).abs().max().item() <= step / 2
    if not symmetric:
        assert torch.equal(deq, w)


# --------------------------------------------------------------------------------- expert weights


def test_int4_expert_weights_sizes_and_bytes():
    cfg = custom(4, 256, 384, 2)  # E=4, H=256, F=384
    w = ExpertWeights.random(cfg, seed=0)
    for symmetric, scale_bytes in ((True, 2), (False, 4)):
        q = Int4ExpertWeights.from_bf16(w, group_size=64, symmetric=symmetric)
        q.check_matches(cfg)
        assert (q.num_experts, q.hidden_size, q.ffn_size) == (4, 256, 384)
        assert q.device == w.device and q.dtype == BF16 and q.group_size == 64 and q.symmetric == symmetric
        values = 4 * 3 * 256 * 384
        assert q.num_values == values
        # codes: 0.5 B per value; scales (and zeros): 2 B per group of 64
        expect = values // 2 + values // 64 * scale_bytes
        assert q.nbytes == expect
        assert q.nbytes == (q.w13.packed.nbytes + q.w13.scales.nbytes + q.w2.packed.nbytes + q.w2.scales.nbytes
                            + (0 if symmetric else q.w13.zeros.nbytes + q.w2.zeros.nbytes))
        assert q.bytes_per_expert() == expect // 4 and q.bytes_for(3) == 3 * expect // 4
        assert q.compression_vs("bf16") == pytest.approx(w.nbytes / q.nbytes)
        assert q.compression_vs("fp32") == pytest.approx(2 * q.compression_vs("bf16"))
        assert q.compression_vs(2) == q.compression_vs("bf16")


def test_compression_at_group_128_is_about_4x_vs_bf16():
    w = ExpertWeights.random(custom(2, 256, 128, 1), seed=0)
    q = Int4ExpertWeights.from_bf16(w)  # defaults: G=128, symmetric
    assert q.bytes_per_value == 0.5 + 2 / 128
    assert q.compression_vs("bf16") == pytest.approx(3.879, abs=1e-3)
    assert q.compression_vs("fp32") == pytest.approx(7.758, abs=1e-3)
    assert q.describe_compression() == ("INT4 symmetric, group size 128: 4.125 bits per weight, "
                                        "3.88x smaller than bf16 (7.76x vs fp32)")


def test_dequantize_gives_expert_weights_of_the_kernel_values():
    w = ExpertWeights.random(custom(3, 128, 64, 2), seed=4)
    q = Int4ExpertWeights.from_bf16(w, group_size=32)
    d = q.dequantize()
    assert isinstance(d, ExpertWeights) and d.dtype == BF16
    assert d.w13.shape == w.w13.shape and d.w2.shape == w.w2.shape
    assert torch.equal(d.w13, dequantize(q.w13, BF16)) and torch.equal(d.w2, dequantize(q.w2, BF16))
    # gate rows (0..F-1) and up rows (F..2F-1) of w13 keep their place
    for rows in (slice(0, 64), slice(64, 128)):
        assert torch.equal(dequantize(quantize(w.w13[:, rows], 32)), d.w13[:, rows])
    err = quantization_error(w, group_size=32)
    assert err["w13"] == pytest.approx(relative_error(d.w13, w.w13.float()), rel=1e-6)
    assert err["w2"] == pytest.approx(relative_error(d.w2, w.w2.float()), rel=1e-6)


def test_error_decreases_with_smaller_group_size():
    w = ExpertWeights.random(custom(2, 512, 256, 1), seed=5)
    for symmetric in (True, False):
        errs = [quantization_error(w, G, symmetric) for G in (256, 128, 64, 32, 16)]
        for name in ("w13", "w2", "total"):
            seq = [e[name] for e in errs]
            assert all(a > b for a, b in zip(seq, seq[1:])), (symmetric, name, seq)
    # Gaussian weights at G=128: RTN error is about 12% (symmetric); asymmetric uses the range better
    sym, asym = quantization_error(w, 128, True), quantization_error(w, 128, False)
    assert 0.08 < sym["total"] < 0.15
    assert asym["total"] < sym["total"]


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("w,G,err,msg", [
    (torch.zeros(1, 2, 100), 128, ValueError, r"group_size=128 does not divide w's reduction dim K=100"),
    (torch.zeros(1, 2, 7), 2, ValueError, "K=7 is odd"),
    (torch.zeros(1, 2, 8, dtype=torch.int32), 8, TypeError, "floating-point"),
    (torch.zeros(1, 2, 8), 0, ValueError, "positive"),
    (torch.zeros(1, 2, 8), -8, ValueError, "positive"),
    (torch.zeros(1, 2, 9), 3, ValueError, "even"),
    (torch.zeros(1, 2, 8), 4.0, TypeError, "int"),
    (torch.zeros(2, 8), 8, ValueError, r"3-D \[E, N, K\]"),
    (torch.zeros(1, 2, 0), 8, ValueError, "is 0"),
], ids=["G-not-dividing-K", "odd-K", "int-dtype", "G-zero", "G-negative", "G-odd", "G-float", "2-D", "K-zero"])
def test_quantize_bad_inputs(w, G, err, msg):
    with pytest.raises(err, match=msg):
        quantize(w, G)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_quantize_non_finite(bad):
    w = torch.ones(2, 2, 8)
    w[1, 0, 3] = bad
    for symmetric in (True, False):
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize(w, 8, symmetric)


def test_from_bf16_names_the_tensor_and_dim():
    w = ExpertWeights.random(custom(2, 256, 96, 1))  # H=256 divides by 128, F=96 does not
    with pytest.raises(ValueError, match=r"does not divide w2's reduction dim F=96"):
        Int4ExpertWeights.from_bf16(w, group_size=128)
    with pytest.raises(TypeError, match="ExpertWeights"):
        Int4ExpertWeights.from_bf16(w.w13)
    with pytest.raises(ValueError, match="unknown baseline 'bf8'"):
        Int4ExpertWeights.from_bf16(w, group_size=32).compression_vs("bf8")


@pytest.mark.parametrize("fn,arg,err,msg", [
    (pack_int4, torch.tensor([0, 16]), ValueError, "0..15"),
    (pack_int4, torch.tensor([-1, 3]), ValueError, "0..15"),
    (pack_int4, torch.tensor([1, 2, 3]), ValueError, "even"),
    (pack_int4, torch.tensor([1.0, 2.0]), TypeError, "integer"),
    (unpack_int4, torch.tensor([1, 2], dtype=torch.int32), TypeError, "uint8"),
    (lambda qt: dequantize(qt, torch.int8), quantize(torch.ones(1, 1, 8), 8), TypeError, "floating-point dtype"),
], ids=["pack-code-16", "pack-code-negative", "pack-odd", "pack-float", "unpack-int32", "dequantize-int-dtype"])
def test_pack_and_dequantize_bad_inputs(fn, arg, err, msg):
    with pytest.raises(err, match=msg):
        fn(arg)


def test_quantized_tensor_checks_its_parts():
    qt = quantize(torch.ones(1, 2, 8), 2, symmetric=False)  # scales [1, 4, 2]
    with pytest.raises(ValueError, match=r"scales must be \[E, K/G, N\]"):  # [E, N, K/G] is the wrong order
        QuantizedTensor(qt.packed, qt.scales.transpose(1, 2).contiguous(), qt.zeros, 2, False, (1, 2, 8))
    with pytest.raises(ValueError, match="zeros must be None"):
        QuantizedTensor(qt.packed, qt.scales, qt.zeros, 2, True, (1, 2, 8))
    with pytest.raises(ValueError, match="packed must be uint8"):
        QuantizedTensor(unpack_int4(qt.packed), qt.scales, qt.zeros, 2, False, (1, 2, 8))

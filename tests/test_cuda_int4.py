"""cuda_int4 (csrc/moe_int4.cu): compiled wherever nvcc is, run on the CPU under a host emulation, and run
for real on a GPU against the float32 reference with the dequantised weights.

Without a GPU (CI):
- csrc/moe_int4.cu compiles with nvcc for sm_80, sm_86, sm_89, sm_90 (+ compute_90 PTX), with the flags
  torch.utils.cpp_extension uses;
- csrc/moe_int4_binding.cpp passes a syntax check against this PyTorch's headers;
- the dequantisation helpers, compiled into a host program, give moe_tut.quant.dequantize's bits exactly;
- the real kernels and launchers, run by csrc/moe_int4_host_emulation.cpp (a fiber per CUDA thread),
  match the reference on awkward shapes for every kernel version.
The compile jobs start together (session fixture `builds`) so they overlap; on a 2-core machine the
whole file takes ~60 s, ~45 s of it the four-architecture nvcc compile.

With a GPU (`@pytest.mark.gpu`): the built extension against the reference, CUDA-graph capture,
determinism, and clear errors for bad inputs.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_tut.backends import BackendUnavailable, get_backend
from moe_tut.backends import cuda_int4 as ci4
from moe_tut.bench.timing import capture_graph
from moe_tut.env import PDL_ENV
from moe_tut.presets import custom, get_preset
from moe_tut.quant import Int4ExpertWeights, QuantizedTensor, dequantize, quantize
from moe_tut.reference import moe_reference, relative_error, swiglu
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

CSRC = ci4.CSRC
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
ARCHS = ci4.TARGET_ARCHS
# act is rounded to bf16 between the GEMMs, the reference keeps float32: measured ~1.7e-3 (act) and
# ~2.5e-3 (y) relative error on the cases below, in the emulation; 1e-2 leaves room, and a wrong index
# gives O(1).
TOL = 1e-2
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: install the CUDA toolkit to compile csrc/")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++/c++) on PATH")


@functools.cache
def cuda_include() -> Path | None:
    """The CUDA toolkit's include dir, as the nvcc on PATH reports it (nvcc may be a wrapper script)."""
    if NVCC is None:
        return None
    try:
        dry = subprocess.run([NVCC, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'INCLUDES="-I([^"]+)"', dry)
    inc = Path(found.group(1).strip()) if found else Path(NVCC).resolve().parents[1] / "include"
    return inc if (inc / "cuda_runtime_api.h").is_file() else None


def nvcc_flags() -> list[str]:
    """The flags torch.utils.cpp_extension gives nvcc (so CI compiles what a user's build compiles)."""
    from torch.utils import cpp_extension

    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    return ["-std=c++20", "-O3", *common, f"-I{CSRC}"]


# --------------------------------------------------------------------------- compile jobs (CPU)


class Job:
    """A compiler process started now and waited for by the test that needs it."""

    def __init__(self, cmd: list[str], cwd: Path):
        self.cmd = cmd
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._result = None

    def result(self, timeout: float = 600) -> tuple[int, str, float]:
        if self._result is None:
            out, _ = self.proc.communicate(timeout=timeout)
            self._result = (self.proc.returncode, out, time.perf_counter() - self.start)
        return self._result


def binding_syntax_cmd(tmp: Path) -> list[str] | None:
    """g++ -fsyntax-only of the binding against this PyTorch's headers, or None if they are not all here.

    A CPU-only PyTorch wheel ships c10/cuda's headers but not the one CMake generates for CUDA builds,
    c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS); a stand-in with
    that one define lets the syntax check run there.
    """
    from torch.utils import cpp_extension

    inc = cuda_include()
    if CXX is None or inc is None:
        return None
    torch_inc = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in torch_inc):
        return None
    stub = tmp / "stub"
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in torch_inc):
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in torch_inc] + [f"-I{stub}", f"-I{inc}", f"-I{sysconfig.get_paths()['include']}",
                                                f"-I{CSRC}"]
    return [CXX, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=moe_int4_syntax_check", *includes,
            str(CSRC / "moe_int4_binding.cpp")]


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """Start every compile of this file at once (they overlap), keyed by name; None = cannot run here."""
    tmp = tmp_path_factory.mktemp("cuda_int4_build")
    jobs: dict[str, Job | None] = {}
    for arch in ARCHS:
        code = f"[sm_{arch},compute_{arch}]" if arch == ci4.PTX_ARCH else f"sm_{arch}"
        jobs[f"sm_{arch}"] = Job([NVCC, *nvcc_flags(), f"-gencode=arch=compute_{arch},code={code}", "-c",
                                  str(CSRC / "moe_int4.cu"), "-o", str(tmp / f"moe_int4_sm{arch}.o")], tmp) \
            if NVCC else None
    jobs["dequant_check"] = Job([NVCC, "-std=c++17", "-O2", str(CSRC / "moe_int4_dequant_check.cu"), "-o",
                                 str(tmp / "dequant_check")], tmp) if NVCC else None
    inc = cuda_include()
    jobs["emulation"] = Job([CXX, "-std=c++20", "-O1", f"-I{inc}", f"-I{CSRC}",
                             str(CSRC / "moe_int4_host_emulation.cpp"), "-o", str(tmp / "emulation")], tmp) \
        if CXX and inc and sys.platform.startswith("linux") else None
    cmd = binding_syntax_cmd(tmp)
    jobs["binding"] = Job(cmd, tmp) if cmd else None
    yield tmp, jobs
    for job in jobs.values():
        if job is not None and job.proc.poll() is None:
            job.proc.kill()


def finished(builds, name: str) -> tuple[int, str, float]:
    tmp, jobs = builds
    job = jobs[name]
    if job is None:
        pytest.skip(f"{name}: the toolchain for it is not on this machine")
    return job.result()


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_compiles(builds, arch):
    rc, out, seconds = finished(builds, f"sm_{arch}")
    assert rc == 0, f"nvcc for sm_{arch} failed:\n{out[-4000:]}"
    assert (builds[0] / f"moe_int4_sm{arch}.o").stat().st_size > 0
    print(f"sm_{arch}: compiled in {seconds:.1f} s (all four architectures compile at once)")


@needs_nvcc
def test_binding_syntax(builds):
    rc, out, seconds = finished(builds, "binding")
    assert rc == 0, f"the binding does not compile against this PyTorch's headers:\n{out[-4000:]}"


def test_build_flags_target_the_promised_gpus(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = ci4.gencode_flags()
    for arch in ("80", "86", "89", "90"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for GPUs newer than sm_90
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert ci4.gencode_flags() == []  # then PyTorch's own arch handling decides


def test_extension_name_tracks_every_source():
    # Any edit to csrc/ (headers included) must give a new extension name, hence a fresh build.
    assert ci4.extension_name().startswith("moe_tut_cuda_int4_")
    assert set(ci4.SOURCES + ci4.HEADERS) >= {"moe_int4.cu", "moe_int4_binding.cpp", "moe_int4.h",
                                               "moe_int4_dequant.cuh"}
    included = {ln.split('"')[1] for f in ci4.SOURCES for ln in (CSRC / f).read_text().splitlines()
                if ln.startswith('#include "')}
    assert included <= set(ci4.SOURCES + ci4.HEADERS), "a csrc header is missing from the hash"


def test_version_selection(monkeypatch):
    monkeypatch.delenv(ci4.VERSION_ENV, raising=False)
    assert ci4.resolve_version() == ci4.DEFAULT_VERSION
    assert ci4.resolve_version(num_tokens=1) == ci4.DEFAULT_VERSION_T1
    assert ci4.resolve_version(num_tokens=4) == ci4.DEFAULT_VERSION
    assert ci4.resolve_version(1, num_tokens=4) == 1
    monkeypatch.setenv(ci4.VERSION_ENV, "2")
    assert ci4.resolve_version() == 2
    assert ci4.resolve_version(num_tokens=16) == 2  # the pin wins over the token-count default
    with pytest.raises(ValueError, match="one of"):
        ci4.resolve_version(ci4.LATEST_VERSION + 1)
    monkeypatch.setenv(ci4.VERSION_ENV, "fast")
    with pytest.raises(ValueError, match=ci4.VERSION_ENV):
        ci4.resolve_version()
    h = (CSRC / "moe_int4.h").read_text()
    assert f"#define MOE_INT4_LATEST_VERSION {ci4.LATEST_VERSION}" in h  # Python and C agree
    # the extra-bytes estimate's split bounds mirror the launcher's
    assert f"#define MOE_INT4_MAX_SPLITS {ci4.MAX_SPLITS}" in h
    assert f"constexpr int kMaxSplitRows = {ci4.MAX_SPLIT_ROWS};" in (CSRC / "moe_int4.cu").read_text()


def test_first_error_line():
    log = "[1/3] c++ ...\nFAILED: moe_int4.cuda.o\n/x/moe_int4.cu(12): error: identifier \"foo\" is undefined\nmore\n"
    assert ci4.first_error_line(log) == '/x/moe_int4.cu(12): error: identifier "foo" is undefined'


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine behaviour")
def test_unavailable_without_gpu_says_why():
    b = get_backend("cuda_int4")
    assert b.weight_format == "int4" and b.graph_safe
    assert "CUDA GPU" in b.unavailable(get_preset("debug"), torch.device("cpu"))
    assert b.unavailable(get_preset("debug"), torch.device("cuda"))  # a reason, not an exception
    with pytest.raises(BackendUnavailable):
        b.check_available(get_preset("debug"), torch.device("cpu"))


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only PyTorch behaviour")
def test_build_command_says_why_it_cannot_build(capsys):
    # `python -m moe_tut.backends.cuda_int4 --build` on a CPU-only PyTorch: exit code 1 and the reason.
    assert ci4.main(["--build"]) == 1
    err = capsys.readouterr().err
    assert "CPU-only build" in err
    assert ci4.main([]) == 1 and "toolchain:" in capsys.readouterr().out


# -------------------------------------------------------------------- dequantisation, bit for bit


def _raw(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _random_bf16(shape, gen, exp_lo, exp_hi, signed):
    """bf16 values from random bit fields: exponents exp_lo..exp_hi-1 (0 = subnormal), any mantissa."""
    e = torch.randint(exp_lo, exp_hi, shape, generator=gen)
    m = torch.randint(0, 128, shape, generator=gen)
    s = torch.randint(0, 2, shape, generator=gen) if signed else torch.zeros(shape, dtype=torch.long)
    return ((s << 15) | (e << 7) | m).to(torch.int16).view(torch.bfloat16)


DEQUANT_CASES = [  # (id, N, K, G, symmetric, source)
    ("sym-G32", 5, 64, 32, True, "weights"),
    ("asym-G128", 3, 256, 128, False, "weights"),
    ("sym-G8", 4, 48, 8, True, "weights"),  # the 4-byte path's group size
    ("asym-G2-K12", 2, 12, 2, False, "weights"),  # K and G below a word: only the per-code path applies
    ("sym-raw-bits", 64, 256, 32, True, "raw"),  # random codes and scales over the whole bf16 range
    ("asym-raw-bits", 64, 256, 32, False, "raw"),
    ("asym-big-zero", 64, 256, 32, False, "big_zero"),  # |zero| >> code * scale: where rounding could bite
]


@needs_nvcc
@pytest.mark.parametrize("case", DEQUANT_CASES, ids=[c[0] for c in DEQUANT_CASES])
def test_dequant_helpers_match_spec_bitwise(builds, case, tmp_path):
    rc, out, _ = finished(builds, "dequant_check")
    assert rc == 0, out[-4000:]
    _, N, K, G, sym, source = case
    gen = torch.Generator().manual_seed(N * K + G)
    if source == "weights":
        qt = quantize(torch.randn(1, N, K, generator=gen).to(torch.bfloat16), G, sym)
    else:
        packed = torch.randint(0, 256, (1, N, K // 2), generator=gen, dtype=torch.uint8)
        if source == "raw":
            scales = _random_bf16((1, K // G, N), gen, 0, 250, signed=False)  # 0 = subnormal scales too
            zeros = None if sym else _random_bf16((1, K // G, N), gen, 0, 250, signed=True)
        else:
            scales = _random_bf16((1, K // G, N), gen, 100, 130, signed=False)
            zeros = _random_bf16((1, K // G, N), gen, 135, 145, signed=True)
        qt = QuantizedTensor(packed, scales, zeros, G, sym, (1, N, K))
    _raw(qt.packed[0]).tofile(tmp_path / "p.bin")
    _raw(qt.scales[0]).tofile(tmp_path / "s.bin")
    if not sym:
        _raw(qt.zeros[0]).tofile(tmp_path / "z.bin")
    run = subprocess.run([str(builds[0] / "dequant_check"), str(N), str(K), str(G), "p.bin", "s.bin",
                          "-" if sym else "z.bin", "pairs.bin", "one.bin"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    spec = dequantize(qt)[0].view(torch.int16)
    one = torch.from_numpy(np.fromfile(tmp_path / "one.bin", dtype=np.int16)).view(N, K)
    assert torch.equal(one, spec), "v1's per-code dequant differs from moe_tut.quant.dequantize"
    if K % 8 == 0 and G % 8 == 0:  # where v2/v3's word path runs
        pairs = torch.from_numpy(np.fromfile(tmp_path / "pairs.bin", dtype=np.int16)).view(N, K)
        assert torch.equal(pairs, spec), "v2/v3's bf16x2 dequant differs from moe_tut.quant.dequantize"


# ------------------------------------------------------------------------- shared case set-up


def setup_case(E, H, F, k, T, skew, G, sym, seed=0, device="cpu", G2=None):
    """Random weights quantised with group size G (w13; G2 for w2 if given), routing, x and the plan."""
    cfg = custom(E, H, F, k)
    w = ExpertWeights.random(cfg, device=device, seed=seed)
    q = Int4ExpertWeights(quantize(w.w13, G, sym), quantize(w.w2, G2 or G, sym), w.dtype)
    ids, tw = simulate_routing(T, E, k, skew, seed=seed, device=device)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 7)).to(device, torch.bfloat16)
    return q, x, ids, tw, RoutingPlan.build(ids, tw, E)


def act_reference(x, deq: ExpertWeights, plan: RoutingPlan) -> torch.Tensor:
    """GEMM1 + SwiGLU of every sorted row in float32: what `act` holds before its bf16 rounding."""
    experts = torch.repeat_interleave(torch.arange(plan.num_experts, device=x.device), plan.expert_counts.long())
    xs = x[plan.sorted_token_ids.long()].float()
    h = torch.einsum("rh,rnh->rn", xs, deq.w13[experts].float())
    return swiglu(h)


# (id, E, H, F, top_k, T, skew, G, symmetric): each odd shape says which edge it covers.
EMULATION_CASES = [
    ("T1", 4, 64, 128, 2, 1, "uniform", 32, True),  # one decode token: the one-row kernel (max rows 1)
    ("empty-experts-asym", 8, 64, 128, 1, 3, "uniform", 32, False),  # most experts get nothing; asymmetric
    ("topk-eq-E-passes", 2, 64, 96, 2, 7, "uniform", 32, True),  # each expert gets all 7 tokens: passes of 4 + 3
    ("vec4-path", 3, 40, 72, 2, 5, "uniform", 8, True),  # H, F, G not multiples of 32: 4-byte loads
    ("v1-fallback-G2", 3, 66, 98, 2, 3, "uniform", 2, False),  # G = 2, H/F not multiples of 8: v2/v3 run v1
    ("all-to-one", 3, 64, 96, 1, 6, "all_to_one", 32, True),  # every token to expert 0: passes of 4 + 2
    ("top3-generic-combine", 5, 64, 96, 3, 3, "zipf", 32, True),  # k = 3: the combine's loop for any k
    # G = 96 does not divide a lane's 1024-code stride: the chunk's group index carries (dot_rows)
    ("G96-group-carry", 2, 1152, 96, 1, 2, "uniform", 96, False),
]


# v4/v5 (tensor cores) need K % 128 == 0 and G % 32 == 0: (id, E, H, F, top_k, T, skew, G13, G2, symmetric).
MMA_CASES = [
    ("mma-T1-gemm2-split", 4, 128, 1024, 2, 1, "uniform", 128, 128, True),  # GEMM2 splits K over 2 blocks
    ("mma-T5-asym-G32", 3, 256, 256, 2, 5, "zipf", 32, 32, False),  # several rows per expert, asymmetric
    ("mma-T12-two-ntiles", 2, 256, 128, 2, 12, "uniform", 64, 128, True),  # 12 rows: n-tiles of 8 + 4
    ("mma-T40-passes", 2, 128, 128, 1, 40, "all_to_one", 128, 128, True),  # 40 rows on one expert: 32 + 8
    ("mma-gemm1-partial-cols", 3, 256, 200, 2, 3, "uniform", 128, 8, True),  # F = 200: last tile 8 columns
    ("mma-gemm2-partial-cols", 3, 272, 256, 2, 3, "uniform", 16, 64, False),  # H = 272: last tile 16 columns
    ("mma-empty-experts", 8, 128, 256, 1, 3, "uniform", 64, 64, True),  # most experts get nothing
    ("mma-top8-T1-split", 16, 32, 1024, 8, 1, "uniform", 32, 128, True),  # k = 8 slots, GEMM2 in 2 K splits
    ("mma-G96-group-carry", 2, 768, 384, 1, 2, "uniform", 96, 96, True),  # a warp's 512-code step carries a group
]
EMULATED_SMS = 4  # the GPU size the emulation's K-split rule assumes: small, so toy shapes split


def expected_path(version: int, K: int, G: int) -> int:
    """The path the launcher should pick (moe_int4_path) for aligned buffers: 1 = v1, 4/16 = v2/v3's load
    width, 64 = v4/v5's tensor cores."""
    if version == 1:
        return 1
    if version >= 4 and K % 128 == 0 and G % 32 == 0:
        return 64
    return 16 if K % 32 == 0 and G % 32 == 0 else 4 if K % 8 == 0 and G % 8 == 0 else 1


def expected_splits(version: int, E: int, H: int, F: int, G2: int, rows: int, sms: int) -> int:
    """GEMM2's K splits (moe_int4_gemm2_splits): v4/v5 only, at most 256 rows, doubling while the blocks
    are fewer than 4 per SM and each split keeps a chunk per warp."""
    if expected_path(version, F, G2) != 64 or rows > 256:
        return 1
    blocks, chunks, s = -(-H // 32) * min(E, rows), F // 128, 1
    while s < 8 and blocks * s < 4 * sms and chunks // (2 * s) >= 4:
        s *= 2
    return s


def run_emulation(builds, tmp: Path, q: Int4ExpertWeights, x, plan: RoutingPlan, version: int, misalign=False,
                  topk: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Run the emulated forward; returns (act, out, y, paths) as CPU tensors. With topk = (ids, weights) [1, k]
    (any strides) it also runs the single-token path: paths then holds its "t1" error code, and the returned
    act and y are a pair more, (act, out, y, paths, act_t1, y_t1)."""
    rc, out, _ = finished(builds, "emulation")
    assert rc == 0, f"the host emulation does not compile:\n{out[-4000:]}"
    T, H = x.shape
    E, F, k = q.num_experts, q.ffn_size, plan.top_k
    _raw(x).tofile(tmp / "x.bin")
    for name, qt in (("w13", q.w13), ("w2", q.w2)):
        _raw(qt.packed).tofile(tmp / f"{name}_packed.bin")
        _raw(qt.scales).tofile(tmp / f"{name}_scales.bin")
        if qt.zeros is not None:
            _raw(qt.zeros).tofile(tmp / f"{name}_zeros.bin")
    for name in ("sorted_token_ids", "sorted_slots", "sorted_weights", "expert_offsets"):
        _raw(getattr(plan, name)).tofile(tmp / f"{name}.bin")
    if topk is not None:
        ids_t, w_t = topk
        weight_type = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[w_t.dtype]
        for t, name in ((ids_t, "topk_ids"), (w_t, "topk_weights")):  # the strided span, from the first element
            _raw(t.as_strided((t.stride(1) * k,), (1,))).tofile(tmp / f"{name}.bin")
        (tmp / "topk.txt").write_text(f"{ids_t.element_size()} {weight_type} {ids_t.stride(1)} {w_t.stride(1)}\n")
    (tmp / "params.txt").write_text(f"{T} {k} {E} {H} {F} {q.w13.group_size} {q.w2.group_size} {version} "
                                    f"{int(q.w13.symmetric)} {int(q.w2.symmetric)} {int(misalign)} {EMULATED_SMS}\n")
    run = subprocess.run([str(builds[0] / "emulation"), str(tmp)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    paths = dict(p.split("=") for p in run.stdout.split()[1:])

    def load(name, dtype, shape):
        a = np.fromfile(tmp / f"{name}.bin", dtype=dtype)
        t = torch.from_numpy(a)
        return (t.view(torch.bfloat16) if dtype == np.int16 else t).view(*shape)

    rows = T * k
    paths = {key: int(v) for key, v in paths.items()}
    result = (load("act", np.int16, (rows, F)), load("out", np.float32, (paths["splits"] * rows, H)),
              load("y", np.int16, (T, H)), paths)
    if topk is None:
        return result
    return (*result, load("act_t1", np.int16, (k, F)), load("y_t1", np.int16, (1, H)))


@needs_cxx
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host emulation uses Linux ucontext fibers")
@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("case", EMULATION_CASES, ids=[c[0] for c in EMULATION_CASES])
def test_emulated_kernels_match_reference(builds, case, version, tmp_path):
    # v4 on these shapes (K not a multiple of 128) takes v3's kernels: checks the fallback
    _, E, H, F, k, T, skew, G, sym = case
    check_emulated(builds, tmp_path, version, E, H, F, k, T, skew, G, G, sym)


@needs_cxx
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host emulation uses Linux ucontext fibers")
@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("case", MMA_CASES, ids=[c[0] for c in MMA_CASES])
def test_emulated_mma_kernels_match_reference(builds, case, version, tmp_path):
    _, E, H, F, k, T, skew, G13, G2, sym = case
    paths = check_emulated(builds, tmp_path, version, E, H, F, k, T, skew, G13, G2, sym)
    assert 64 in (paths["gemm1"], paths["gemm2"])  # each case runs the tensor-core kernel in one GEMM or both
    if case[0] in ("mma-T1-gemm2-split", "mma-top8-T1-split"):
        assert paths["splits"] == 2


def check_emulated(builds, tmp_path, version, E, H, F, k, T, skew, G13, G2, sym) -> dict[str, int]:
    q, x, ids, tw, plan = setup_case(E, H, F, k, T, skew, G13, sym, G2=G2)
    act, out, y, paths = run_emulation(builds, tmp_path, q, x, plan, version)
    assert paths == {"gemm1": expected_path(version, H, G13), "gemm2": expected_path(version, F, G2),
                     "splits": expected_splits(version, E, H, F, G2, T * k, EMULATED_SMS)}
    # NaN = an element no kernel wrote (the emulation fills outputs with NaN first)
    assert not torch.isnan(act.float()).any() and not torch.isnan(out).any() and not torch.isnan(y.float()).any()
    deq = q.dequantize()
    assert relative_error(act, act_reference(x, deq, plan)) < TOL
    assert relative_error(y, moe_reference(x, deq, ids, tw)) < TOL
    # the combine, bit for bit: per token slot the sum of its K splits, then the slots in order, float32, one rounding
    parts = out.view(paths["splits"], T, k, H)
    per_slot = parts[0].clone()
    for s in range(1, paths["splits"]):
        per_slot += parts[s]
    expect = per_slot[:, 0].clone()
    for j in range(1, k):
        expect += per_slot[:, j]
    assert torch.equal(y, expect.to(torch.bfloat16))
    return paths


@needs_cxx
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host emulation uses Linux ucontext fibers")
def test_emulated_misaligned_activations_fall_back_to_v1(builds, tmp_path):
    # x one bf16 past a 16-byte boundary: GEMM1 cannot use 16-byte loads and must run v1, still correct.
    q, x, ids, tw, plan = setup_case(4, 64, 128, 2, 2, "uniform", 32, True)
    act, out, y, paths = run_emulation(builds, tmp_path, q, x, plan, version=3, misalign=True)
    assert paths == {"gemm1": 1, "gemm2": 16, "splits": 1}
    assert relative_error(y, moe_reference(x, q.dequantize(), ids, tw)) < TOL


# The single-token path (moe_int4_forward_t1): (id, E, H, F, top_k, G, symmetric, ids dtype, weights dtype,
# element stride of both, ids or None for the simulated routing).
T1_CASES = [
    ("k2-int64-f32", 4, 64, 128, 2, 32, True, torch.int64, torch.float32, 1, None),  # mixtral's k: 2 groups/block
    ("k3-int32-bf16-asym", 5, 64, 96, 3, 32, False, torch.int32, torch.bfloat16, 1, None),  # 3 warps, 1 group
    ("k8-strided-f16", 16, 96, 64, 8, 32, True, torch.int64, torch.float16, 2, None),  # 8 warps; strided routing
    ("k1-one-expert", 3, 96, 64, 1, 32, False, torch.int64, torch.float32, 1, None),  # 4 groups per block
    ("k10-two-units-per-warp", 12, 64, 64, 10, 32, True, torch.int32, torch.float32, 1, None),  # 8 warps, 10 units
    ("duplicate-ids", 4, 64, 96, 3, 32, True, torch.int64, torch.float32, 1, [2, 2, 0]),  # an expert twice
]


def t1_routing(E, k, ids_dtype, w_dtype, stride, ids, seed=0):
    """A [1, k] top-k in the given dtypes with element stride `stride` (views into wider tensors)."""
    sim_ids, sim_w = simulate_routing(1, E, k, "uniform", seed=seed)
    if ids is not None:
        sim_ids = torch.tensor([ids])
    ids_base = torch.full((1, k * stride), -1, dtype=ids_dtype)
    w_base = torch.zeros(1, k * stride, dtype=w_dtype)
    ids_base[:, ::stride] = sim_ids.to(ids_dtype)
    w_base[:, ::stride] = sim_w.to(w_dtype)
    return ids_base[:, ::stride], w_base[:, ::stride]


@needs_cxx
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host emulation uses Linux ucontext fibers")
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("case", T1_CASES, ids=[c[0] for c in T1_CASES])
def test_emulated_single_token_path_matches_three_launches(builds, case, version, tmp_path):
    # Two launches from the router's top-k must give the bits of GEMM1 + GEMM2 + combine on the RoutingPlan.
    _, E, H, F, k, G, sym, ids_dtype, w_dtype, stride, fixed = case
    q, x, *_ = setup_case(E, H, F, k, 1, "uniform", G, sym)
    ids, tw = t1_routing(E, k, ids_dtype, w_dtype, stride, fixed)
    plan = RoutingPlan.build(ids, tw, E)
    act, out, y, paths, act_t1, y_t1 = run_emulation(builds, tmp_path, q, x, plan, version, topk=(ids, tw))
    assert paths["t1"] == 0 and paths["gemm1"] == paths["gemm2"] == 16
    assert torch.equal(y_t1, y)
    assert torch.equal(act_t1, act[plan.slot_to_sorted.long()])  # slot order vs sorted order, same rows
    assert relative_error(y_t1, moe_reference(x, q.dequantize(), ids.long(), tw.float())) < TOL


CUDA_ERROR_NOT_SUPPORTED = 801


@needs_cxx
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host emulation uses Linux ucontext fibers")
def test_emulated_single_token_path_out_of_range_id_adds_nothing(builds, tmp_path):
    # No RoutingPlan sorts ids away here: an id outside [0, E) must neither be read past the weights nor count.
    E, H, F, k = 4, 64, 96, 3
    q, x, *_ = setup_case(E, H, F, k, 1, "uniform", 32, True)
    ids, tw = t1_routing(E, k, torch.int64, torch.float32, 1, [1, E + 3, 0])
    # the same sum with the bad slot given expert 0 and weight 0: 0 * dot adds nothing to y's float32 sum
    ok_ids, ok_w = ids.clone(), tw.clone()
    ok_ids[0, 1], ok_w[0, 1] = 0, 0.0
    plan = RoutingPlan.build(ok_ids, ok_w, E)
    *_, y, paths, _, y_t1 = run_emulation(builds, tmp_path, q, x, plan, 2, topk=(ids, tw))
    assert paths["t1"] == 0 and torch.equal(y_t1, y)


@needs_cxx
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host emulation uses Linux ucontext fibers")
@pytest.mark.parametrize("version,shape", [(1, (4, 64, 128)), (4, (4, 64, 128)), (2, (3, 40, 72))],
                         ids=["v1", "v4", "vec4-path"])
def test_emulated_single_token_path_declines_what_it_does_not_cover(builds, version, shape, tmp_path):
    E, H, F = shape
    q, x, *_ = setup_case(E, H, F, 2, 1, "uniform", 8 if H % 32 else 32, True)
    ids, tw = t1_routing(E, 2, torch.int64, torch.float32, 1, None)
    plan = RoutingPlan.build(ids, tw, E)
    *_, paths, act_t1, y_t1 = run_emulation(builds, tmp_path, q, x, plan, version, topk=(ids, tw))
    assert paths["t1"] == CUDA_ERROR_NOT_SUPPORTED
    assert torch.isnan(y_t1.float()).all() and torch.isnan(act_t1.float()).all()  # nothing was launched


# ---------------------------------------------------------------------------------------- GPU

GPU_CASES = EMULATION_CASES + [  # larger and more varied than the emulation can afford
    ("debug-T16", 4, 512, 1024, 2, 16, "uniform", 128, True),
    ("debug-T16-asym", 4, 512, 1024, 2, 16, "uniform", 128, False),
    ("one-hot-expert", 6, 256, 384, 2, 40, "hot", 128, True),  # one expert takes almost every token
    ("prime-E-zipf", 7, 96, 160, 3, 29, "zipf", 32, False),  # prime E, skewed load
    ("topk-eq-E", 4, 128, 256, 4, 17, "uniform", 64, True),  # every expert gets every token
    ("many-rows", 2, 256, 512, 1, 300, "uniform", 128, True),  # 150 rows per expert: dozens of passes
]


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        return ci4.load_extension()
    except BackendUnavailable as exc:
        pytest.fail(f"the extension does not build on this GPU machine: {exc}")


GPU_MMA_CASES = MMA_CASES + [
    ("mma-mixtral-like-T4", 8, 1024, 3584, 2, 4, "uniform", 128, 128, True),
    ("mma-dsv3-like-T16-asym", 32, 1024, 512, 8, 16, "zipf", 128, 128, False),
    ("mma-hot-T64", 4, 512, 1024, 2, 64, "hot", 128, 128, True),  # 4 n-tiles, several passes
]
ALL_VERSIONS = list(range(1, ci4.LATEST_VERSION + 1))


@pytest.mark.gpu
@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("case", [(*c[:8], c[7], c[8]) for c in GPU_CASES] + GPU_MMA_CASES,
                         ids=[c[0] for c in GPU_CASES + GPU_MMA_CASES])
def test_gpu_matches_reference(ext, case, version):
    _, E, H, F, k, T, skew, G, G2, sym = case
    q, x, ids, tw, plan = setup_case(E, H, F, k, T, skew, G, sym, device="cuda", G2=G2)
    y = ci4.cuda_int4_forward(x, q, plan, version=version)
    assert y.shape == (T, H) and y.dtype == torch.bfloat16
    deq = q.dequantize()
    assert relative_error(y, moe_reference(x, deq, ids, tw)) < TOL
    act = ext.gemm1_swiglu(x, q.w13.packed, q.w13.scales, q.w13.zeros, plan.sorted_token_ids, plan.expert_offsets,
                           G, version)
    assert relative_error(act, act_reference(x, deq, plan)) < TOL


@pytest.mark.gpu
def test_gpu_registered_backend_on_debug_preset(ext):
    cfg = get_preset("debug")
    b = get_backend("cuda_int4")
    assert b.unavailable(cfg, torch.device("cuda")) is None
    w = ExpertWeights.random(cfg, device="cuda")
    ids, tw = simulate_routing(8, cfg.E, cfg.top_k, "zipf", device="cuda")
    x = torch.randn(8, cfg.H, device="cuda", dtype=torch.bfloat16)
    prepared = b.prepare(w)
    y = b(x, prepared, RoutingPlan.build(ids, tw, cfg.E))
    assert relative_error(y, moe_reference(x, b.dequantized(prepared), ids, tw)) < TOL
    # against the bf16 weights the error is INT4's own: 0.20-0.21 here (measured on the CPU, same shapes)
    assert relative_error(y, moe_reference(x, w, ids, tw)) < 0.3


@pytest.mark.gpu
@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_gpu_graph_capture_and_determinism(ext, version):
    # v4/v5: a shape whose GEMM2 splits K (2 splits on any GPU with >= 4 SMs), so the split path is checked too
    shape = (4, 256, 2048, 2, 1) if version >= 4 else (8, 256, 512, 2, 4)
    q, x, ids, tw, plan = setup_case(*shape, "uniform", 128, True, device="cuda")
    eager = ci4.cuda_int4_forward(x, q, plan, version=version)
    assert torch.equal(eager, ci4.cuda_int4_forward(x, q, plan, version=version))  # no atomics: same bits
    graph, y = capture_graph(lambda: ci4.cuda_int4_forward(x, q, plan, version=version))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [2, 5])
def test_gpu_programmatic_launch_gives_the_same_bits(ext, version, monkeypatch):
    # With programmatic dependent launch (sm_90+) each kernel may start before the previous one ends and GEMM2
    # reads weights before its wait: a wait in the wrong place would let GEMM2 read the previous forward's act
    # (the allocator hands the same memory to each forward's act), so inputs alternate, eager and in a graph.
    shape = (16, 512, 1024, 4, 1) if version == 2 else (16, 512, 1024, 4, 3)
    q, x, ids, tw, plan = setup_case(*shape, "uniform", 128, True, device="cuda")
    xs = [x, torch.randn_like(x), x.flip(0).contiguous()]
    monkeypatch.setenv(PDL_ENV, "0")
    expected = [ci4.cuda_int4_forward(xi, q, plan, version=version) for xi in xs]
    monkeypatch.setenv(PDL_ENV, "1")
    for _ in range(3):
        for xi, want in zip(xs, expected):
            assert torch.equal(ci4.cuda_int4_forward(xi, q, plan, version=version), want)
    src = x.clone()
    graph, y = capture_graph(lambda: ci4.cuda_int4_forward(src, q, plan, version=version))
    for _ in range(3):
        for xi, want in zip(xs, expected):
            src.copy_(xi)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, want)


GPU_T1_CASES = T1_CASES + [
    ("mixtral-like", 8, 1024, 3584, 2, 128, True, torch.int64, torch.float32, 1, None),
    ("dsv3-like-asym-bf16", 32, 1024, 512, 8, 128, False, torch.int32, torch.bfloat16, 1, None),
    ("k16-strided", 64, 512, 256, 16, 128, True, torch.int64, torch.float16, 3, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("case", GPU_T1_CASES, ids=[c[0] for c in GPU_T1_CASES])
def test_gpu_single_token_path_matches_three_launches(ext, case, version):
    # One token takes two launches from the router's top-k and never reads the (deferred) plan; same bits as the
    # three launches on the sorted plan, eagerly and replayed in a graph with changing inputs.
    _, E, H, F, k, G, sym, ids_dtype, w_dtype, stride, fixed = case
    q, x, *_ = setup_case(E, H, F, k, 1, "uniform", G, sym, device="cuda")
    routings = [tuple(t.cuda() for t in t1_routing(E, k, ids_dtype, w_dtype, stride, fixed, seed=s)) for s in (0, 1)]
    xs = [x, torch.randn_like(x)]
    w13, w2 = q.w13, q.w2

    def three_launches(xi, ids, tw):
        plan = RoutingPlan.build(ids, tw, E)
        return ext.forward(xi, w13.packed, w13.scales, w13.zeros, G, w2.packed, w2.scales, w2.zeros, G,
                           plan.sorted_token_ids, plan.sorted_slots, plan.sorted_weights, plan.expert_offsets, k,
                           version)

    for xi, (ids, tw) in zip(xs, routings):
        plan = RoutingPlan.build(ids, tw, E, defer=True)
        y = ci4.cuda_int4_forward(xi, q, plan, version=version)
        assert not plan.is_built
        assert torch.equal(y, three_launches(xi, ids, tw))
        assert relative_error(y, moe_reference(xi, q.dequantize(), ids.long(), tw.float())) < TOL
    src_x, (src_ids, src_w) = x.clone(), (t.clone() for t in routings[0])
    graph, y = capture_graph(
        lambda: ci4.cuda_int4_forward(src_x, q, RoutingPlan.build(src_ids, src_w, E, validate=False, defer=True),
                                      version=version))
    for _ in range(2):
        for xi, (ids, tw) in zip(xs, routings):
            src_x.copy_(xi)
            src_ids.copy_(ids)
            src_w.copy_(tw)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, three_launches(xi, ids, tw))


@pytest.mark.gpu
def test_gpu_single_token_path_out_of_range_id_adds_nothing(ext):
    q, x, *_ = setup_case(4, 256, 512, 3, 1, "uniform", 128, True, device="cuda")
    ids, tw = (t.cuda() for t in t1_routing(4, 3, torch.int64, torch.float32, 1, [1, 9, 0]))
    ok_ids, ok_w = ids.clone(), tw.clone()
    ok_ids[0, 1], ok_w[0, 1] = 0, 0.0
    y = ci4.cuda_int4_forward(x, q, RoutingPlan.build(ids, tw, 4, validate=False, defer=True), version=2)
    assert torch.equal(y, ci4.cuda_int4_forward(x, q, RoutingPlan.build(ok_ids, ok_w, 4), version=2))


@pytest.mark.gpu
def test_gpu_single_token_path_falls_back_to_the_plan(ext):
    # float64 weights and v5 have no single-token path: the forward reads the plan and runs the three launches.
    q, x, ids, tw, _ = setup_case(8, 256, 512, 2, 1, "uniform", 128, True, device="cuda")
    for version, weights in ((2, tw.double()), (5, tw)):
        plan = RoutingPlan.build(ids, weights, 8, defer=True)
        y = ci4.cuda_int4_forward(x, q, plan, version=version)
        assert plan.is_built
        assert relative_error(y, moe_reference(x, q.dequantize(), ids, tw)) < TOL


@pytest.mark.gpu
def test_gpu_kernel_paths(ext):
    q, x, *_ = setup_case(4, 256, 512, 2, 4, "uniform", 128, True, device="cuda")
    assert ci4.kernel_path(q, x, version=1) == {"gemm1": 1, "gemm2": 1}
    assert ci4.kernel_path(q, x, version=3) == {"gemm1": 16, "gemm2": 16}
    assert ci4.kernel_path(q, x, version=4) == {"gemm1": 64, "gemm2": 64}
    q8, x8, *_ = setup_case(4, 40, 72, 2, 4, "uniform", 8, True, device="cuda")
    assert ci4.kernel_path(q8, x8, version=2) == {"gemm1": 4, "gemm2": 4}


@pytest.mark.gpu
def test_gpu_bad_inputs_raise_clear_errors(ext):
    q, x, ids, tw, plan = setup_case(4, 64, 128, 2, 3, "uniform", 32, True, device="cuda")
    with pytest.raises(TypeError, match="bf16"):
        ci4.cuda_int4_forward(x.float(), Int4ExpertWeights(q.w13, q.w2, torch.float32), plan)
    with pytest.raises(TypeError, match="Int4ExpertWeights"):
        ci4.cuda_int4_forward(x, q.dequantize(), plan)
    with pytest.raises(ValueError, match="hidden size"):
        ci4.cuda_int4_forward(x[:, :32].contiguous(), q, plan)
    with pytest.raises(ValueError, match="version"):
        ci4.cuda_int4_forward(x, q, plan, version=9)
    w13 = q.w13
    args = dict(x=x, w13_packed=w13.packed, w13_scales=w13.scales, w13_zeros=None,
                sorted_token_ids=plan.sorted_token_ids, expert_offsets=plan.expert_offsets, group_size=32, version=2)
    with pytest.raises(RuntimeError, match="x must be c10::BFloat16|x must be BFloat16"):
        ext.gemm1_swiglu(**{**args, "x": x.half()})
    with pytest.raises(RuntimeError, match="w13_packed must be Byte|w13_packed must be unsigned char"):
        ext.gemm1_swiglu(**{**args, "w13_packed": w13.packed.to(torch.int8)})
    with pytest.raises(RuntimeError, match="w13_scales must be contiguous"):
        ext.gemm1_swiglu(**{**args, "w13_scales": w13.scales.transpose(1, 2).contiguous().transpose(1, 2)})
    with pytest.raises(RuntimeError, match="group_size must be even and divide"):
        ext.gemm1_swiglu(**{**args, "group_size": 24})
    with pytest.raises(RuntimeError, match="w13_scales must be"):
        ext.gemm1_swiglu(**{**args, "group_size": 16})  # scales were made for G = 32
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ext.gemm1_swiglu(**{**args, "sorted_token_ids": plan.sorted_token_ids.cpu()})
    with pytest.raises(RuntimeError, match="expert_offsets must have 5 entries"):
        ext.gemm1_swiglu(**{**args, "expert_offsets": plan.expert_offsets[:-1].contiguous()})
    w2 = q.w2
    t1 = dict(x=x[:1], w13_packed=w13.packed, w13_scales=w13.scales, w13_zeros=None, w13_group_size=32,
              w2_packed=w2.packed, w2_scales=w2.scales, w2_zeros=None, w2_group_size=32, topk_ids=ids[:1],
              topk_weights=tw[:1], version=2)
    assert ext.forward_t1(**t1) is not None
    with pytest.raises(RuntimeError, match="forward_t1 takes one token"):
        ext.forward_t1(**{**t1, "x": x})
    with pytest.raises(RuntimeError, match=r"topk_ids and topk_weights must both be \[1, k\]"):
        ext.forward_t1(**{**t1, "topk_weights": tw[:1, :1]})
    with pytest.raises(RuntimeError, match="routing must be on the activations' device"):
        ext.forward_t1(**{**t1, "topk_ids": ids[:1].cpu()})
    assert ext.forward_t1(**{**t1, "topk_weights": tw[:1].double()}) is None  # no float64 path: the caller's plan


@pytest.mark.gpu
def test_gpu_raw_extension_rejects_version_zero():
    # In a subprocess, so the crash fails this test instead of killing the pytest run.
    code = (
        "import torch, moe_tut, sys; sys.path.insert(0, 'tests'); import test_cuda_int4 as t\n"
        "from moe_tut.backends import cuda_int4 as ci4\n"
        "ext = ci4.load_extension()\n"
        "q, x, ids, tw, plan = t.setup_case(4, 64, 128, 2, 3, 'uniform', 32, True, device='cuda')\n"
        "try:\n"
        "    ext.gemm1_swiglu(x, q.w13.packed, q.w13.scales, None, plan.sorted_token_ids, plan.expert_offsets, 32, 0)\n"
        "except RuntimeError as e:\n"
        f"    sys.exit(0 if 'version must be 1..{ci4.LATEST_VERSION}' in str(e) else 3)\n"
        "sys.exit(4)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_environment_variables_documented():
    # Every knob the backend reads is named in its module docstring, the one place users look.
    doc = ci4.__doc__
    for name in (ci4.VERSION_ENV, PDL_ENV, ci4.BUILD_DIR_ENV, "TORCH_CUDA_ARCH_LIST"):
        assert name in doc

"""cuda_int4: the CUDA C++ W4A16 kernel of csrc/moe_int4.cu, built as a PyTorch extension on first use.

What it runs: three launches per forward (csrc/moe_int4.cu's header has the details and napkin math):

    act [T*k, F] bf16  = silu(x W1^T) * (x W3^T)   per sorted row, INT4 weights dequantised in registers
    out [T*k, H] fp32  = routing weight * (act W2^T), written at each row's slot t*k + j (v4/v5 at decode
                         sizes: one such slice per K split of GEMM2, when its blocks would not fill the GPU)
    y   [T, H]   bf16  = sum over j (and the splits) of out[t*k + j]  (fixed order: bitwise reproducible)

One token (T = 1) with v2/v3, the default there, takes two launches that read the router's topk_ids and
topk_weights directly (the plan's sorted tensors are never read, so a plan built with defer=True launches
nothing): GEMM1 over the k slots, then GEMM2 with the sum over k done in shared memory. Same bits as the three.

It is a DECODE kernel: each block streams a slice of one expert's packed weights once and applies it
to all of that expert's rows (1-16 in decode). With hundreds of rows per expert it still gives the
right answer, but re-reads weights every 4 rows (v2/v3) or 32 rows (v4/v5); the Triton kernels are the
ones built for that.

Weights: Int4ExpertWeights (moe_tut.quant, symmetric or asymmetric, any even group size dividing H
and F); the kernel multiplies with exactly `weights.dequantize()`'s bf16 values. No host sync inside
forward, so it is CUDA-graph safe.

Building: on first use `torch.utils.cpp_extension.load` compiles csrc/ with nvcc and the host
compiler (one to two minutes) into a cache directory (MOE_TUT_BUILD_DIR, default
~/.cache/moe_tut/cuda_int4); later processes load the cached module. Explicitly:
`python -m moe_tut.backends.cuda_int4 --build`. Cubins for sm_80, sm_86, sm_89, sm_90 plus
compute_90 PTX (so newer GPUs JIT-compile it), unless TORCH_CUDA_ARCH_LIST is set, which then
decides. The extension's name carries a hash of csrc/'s files, so editing any of them (headers
included) builds afresh.

Environment: MOE_TUT_CUDA_INT4_VERSION pins the kernel version (1..5, see VERSIONS; default: DEFAULT_VERSION_T1
for one token, DEFAULT_VERSION otherwise, the fastest measured on an H100),
MOE_TUT_PDL=0 turns off programmatic dependent launch (moe_tut.env; on by default, used on sm_90 and newer
only: each kernel may start while the previous one finishes; the results are the same bits either way),
MOE_TUT_BUILD_DIR moves the build cache, TORCH_CUDA_ARCH_LIST overrides the target GPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..env import programmatic_launch_enabled
from ..quant import DEFAULT_GROUP_SIZE, Int4ExpertWeights, int4_moe_reference
from ..routing import RoutingPlan
from .base import Backend, BackendUnavailable, check_inputs

# `python -m moe_tut.backends.cuda_int4` runs this file a second time as __main__ after the package
# import has already imported it (the registry line in backends/__init__.py), and runpy warns about
# exactly that. Harmless here: the second copy only runs the command line (it does not register
# twice, see _register). This filter silences that one message and nothing else.
warnings.filterwarnings("ignore", message=r".*'moe_tut\.backends\.cuda_int4' found in sys\.modules.*",
                        category=RuntimeWarning)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("moe_int4_binding.cpp", "moe_int4.cu")
HEADERS = ("moe_int4.h", "moe_int4_dequant.cuh")
# Compute capabilities the default build makes cubins for (sm_86 and sm_89 could run sm_80's cubin,
# binary compatibility holds within a major version, but their own cubins are tuned for them).
TARGET_ARCHS = ("80", "86", "89", "90")
PTX_ARCH = "90"  # also embed compute_90 PTX, which the driver JIT-compiles on newer GPUs
LATEST_VERSION = 5  # = MOE_INT4_LATEST_VERSION in csrc/moe_int4.h
MAX_SPLITS = 8  # = MOE_INT4_MAX_SPLITS: GEMM2's K splits, each a float32 [T*k, H] slice of `out`
MAX_SPLIT_ROWS = 256  # = kMaxSplitRows in csrc/moe_int4.cu: no K split above this many rows (T*k)
# The default by token count (H100, results/h100/cuda_int4_v1, kernels timed by CUDA-graph replay): at T = 1
# v2 was fastest (mixtral 94 us, 64% of copy; v5 98 us, v4 106 us), from T = 4 on v5 (mixtral T = 16: v5
# 382 us, v4 413 us, v2 757 us). v3 lost to v2 everywhere (results/h100/cuda_int4_v0).
DEFAULT_VERSION = 5
DEFAULT_VERSION_T1 = 2
VERSIONS = {
    1: "simple: a warp per output column, byte loads, per-code dequant, weights re-read per row",
    2: "16-byte weight loads, bf16x2 magic-number dequant, 4 weight rows per warp, grid over active experts",
    3: "v2 + next chunk prefetched into registers, weight loads bypass L1",
    4: "tensor cores: mma.sync with the dequantised weights as A (16 columns) and up to 8 token rows as B; "
       "warps split K, GEMM2 splits K over blocks when its blocks would not fill the GPU",
    5: "v4 + scales applied to each 128-wide chunk's mma sums instead of to every weight (symmetric, G % 128 == 0)",
}
VERSION_ENV = "MOE_TUT_CUDA_INT4_VERSION"
BUILD_DIR_ENV = "MOE_TUT_BUILD_DIR"
BUILD_MESSAGE = "building moe_tut CUDA INT4 kernel (first use, 1-2 min)..."


def gencode_flags() -> list[str]:
    """nvcc -gencode flags of the default build (empty when TORCH_CUDA_ARCH_LIST decides instead)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in TARGET_ARCHS]
    return flags + [f"-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"]


def source_hash() -> str:
    """Hash of every csrc file the extension is built from: part of its name, so edits rebuild."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()[:12]


def extension_name() -> str:
    return f"moe_tut_cuda_int4_{source_hash()}"


def build_root() -> Path:
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "moe_tut" / "cuda_int4"


def toolchain_problem() -> str | None:
    """Why the extension cannot be built here (no sources, CPU-only PyTorch, no nvcc, no ninja), or None."""
    missing = [n for n in SOURCES + HEADERS if not (CSRC / n).is_file()]
    if missing:
        return (f"the CUDA sources are not where moe_tut expects them ({CSRC}: missing {', '.join(missing)}); "
                "install moe_tut from a clone with `pip install -e .`")
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build; the extension needs a CUDA build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc): install one and set CUDA_HOME or put nvcc on PATH"
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    if not nvcc.exists():
        return f"CUDA_HOME is {cpp_extension.CUDA_HOME} but it has no bin/nvcc"
    if not cpp_extension.is_ninja_available():
        return "PyTorch builds extensions with ninja, which is not installed: pip install ninja"
    return None


def first_error_line(text: str) -> str:
    """The compiler's first error line of a failed build log (or its last line if none says error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith("FAILED:") and "Error building extension" not in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


_lock = threading.Lock()
_module = None
_build_error: str | None = None


def load_extension(verbose: bool = False):
    """Build (first time) and import the extension; raises BackendUnavailable with the reason if it cannot."""
    global _module, _build_error
    with _lock:
        if _module is not None:
            return _module
        if _build_error is not None:
            raise BackendUnavailable(f"backend 'cuda_int4' is unavailable: {_build_error}")
        problem = toolchain_problem()
        if problem:
            _build_error = problem
            raise BackendUnavailable(f"backend 'cuda_int4' is unavailable: {problem}")
        from torch.utils import cpp_extension

        name = extension_name()
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")) and not any(build_dir.glob(f"{name}*.pyd")):
            print(BUILD_MESSAGE, file=sys.stderr, flush=True)
        try:
            _module = cpp_extension.load(
                name=name,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", *gencode_flags()],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # the reason goes into unavailable(), never a crash at import
            _build_error = f"building csrc/ failed: {first_error_line(str(exc))} (full log: " \
                           f"python -m moe_tut.backends.cuda_int4 --build --verbose)"
            raise BackendUnavailable(f"backend 'cuda_int4' is unavailable: {_build_error}") from exc
        return _module


def resolve_version(version: int | None = None, num_tokens: int | None = None) -> int:
    """The kernel version to run: the argument, else $MOE_TUT_CUDA_INT4_VERSION, else DEFAULT_VERSION_T1 for a
    single token and DEFAULT_VERSION otherwise (or when num_tokens is not given)."""
    if version is None:
        env = os.environ.get(VERSION_ENV)
        if not env:
            return DEFAULT_VERSION_T1 if num_tokens == 1 else DEFAULT_VERSION
        try:
            version = int(env)
        except ValueError:
            raise ValueError(f"{VERSION_ENV}={env!r} must be one of {sorted(VERSIONS)}") from None
    if isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(f"cuda_int4 kernel version must be one of {sorted(VERSIONS)}, got {version!r}")
    return version


def _check_weights(weights) -> None:
    if not isinstance(weights, Int4ExpertWeights):
        raise TypeError(f"cuda_int4 takes Int4ExpertWeights (get_backend('cuda_int4').prepare(bf16_weights) "
                        f"makes them), got {type(weights).__name__}")


@torch.no_grad()
def cuda_int4_forward(x: torch.Tensor, weights: Int4ExpertWeights, plan: RoutingPlan,
                      version: int | None = None) -> torch.Tensor:
    """y [T, H] bf16: the MoE forward with the CUDA INT4 kernels (version: see VERSIONS)."""
    _check_weights(weights)
    check_inputs(x, weights, plan)
    if x.dtype != torch.bfloat16:
        raise TypeError(f"cuda_int4 computes with bf16 activations, got x of dtype {x.dtype}")
    if x.device.type != "cuda":
        raise BackendUnavailable(f"backend 'cuda_int4' is unavailable: it runs on CUDA GPUs, x is on {x.device}")
    v = resolve_version(version, x.shape[0])
    ext = load_extension()
    ext.set_programmatic_launch(programmatic_launch_enabled())  # the C side also checks for sm_90+
    w13, w2 = weights.w13, weights.w2
    x = x.contiguous()
    if x.shape[0] == 1:  # one token: from the router's top-k, no sorted plan needed (None: not this call)
        y = ext.forward_t1(x, w13.packed, w13.scales, w13.zeros, w13.group_size, w2.packed, w2.scales,
                           w2.zeros, w2.group_size, plan.topk_ids, plan.topk_weights, v)
        if y is not None:
            return y
    return ext.forward(x, w13.packed, w13.scales, w13.zeros, w13.group_size,
                       w2.packed, w2.scales, w2.zeros, w2.group_size,
                       plan.sorted_token_ids, plan.sorted_slots, plan.sorted_weights, plan.expert_offsets,
                       plan.top_k, v)


def kernel_path(weights: Int4ExpertWeights, x: torch.Tensor, version: int | None = None) -> dict[str, int]:
    """The code path each GEMM takes: 1 = v1 kernel (also v2..v5's fallback for K or G not a multiple of 8),
    4 or 16 = the v2/v3 kernel with that load width (also v4/v5's fallback), 64 = the v4/v5 tensor-core
    kernel (K a multiple of 128, G of 32). GEMM2's activations are fresh allocations, so they are as aligned
    as a new tensor (checked against x's allocator alignment here)."""
    _check_weights(weights)
    ext = load_extension()
    v = resolve_version(version)
    fresh = torch.empty(16, dtype=torch.bfloat16, device=x.device)
    return {"gemm1": ext.path(v, weights.hidden_size, weights.w13.group_size, weights.w13.packed, x),
            "gemm2": ext.path(v, weights.ffn_size, weights.w2.group_size, weights.w2.packed, fresh)}


def cuda_int4_unavailable(cfg, device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA INT4 kernel runs on CUDA GPUs only (device is {device})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    if cfg.H % DEFAULT_GROUP_SIZE or cfg.F % DEFAULT_GROUP_SIZE:
        return (f"prepare() quantises with group size {DEFAULT_GROUP_SIZE}, which must divide H and F; got "
                f"H={cfg.H}, F={cfg.F} (call cuda_int4_forward with Int4ExpertWeights of another group size)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"needs compute capability 8.0 or newer (bf16 arithmetic); {torch.cuda.get_device_name(index)} "
                f"is {major}.{minor}")
    try:
        load_extension()
    except BackendUnavailable as exc:
        return str(exc).removeprefix("backend 'cuda_int4' is unavailable: ")
    return None


def cuda_int4_extra_bytes(cfg, T, stats) -> int:
    rows = T * cfg.top_k
    splits = MAX_SPLITS if rows <= MAX_SPLIT_ROWS else 1  # an upper bound: v4/v5 may split GEMM2's K
    return rows * cfg.F * 2 + splits * rows * cfg.H * 4 + T * cfg.H * 2  # act (bf16), out (fp32), y (bf16)


def _register() -> None:
    from . import list_backends, register

    if "cuda_int4" in list_backends():  # already there: this is the `python -m` copy of the module
        return
    register(Backend("cuda_int4", cuda_int4_forward,
                     "CUDA C++ W4A16 decode kernel (csrc/moe_int4.cu): INT4 weights dequantised in registers",
                     extra_bytes=cuda_int4_extra_bytes, unavailable=cuda_int4_unavailable,
                     prepare=lambda w: Int4ExpertWeights.from_bf16(w),
                     dequantized=lambda q: q.dequantize(), reference=int4_moe_reference, graph_safe=True,
                     weight_format="int4"))


_register()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_tut.backends.cuda_int4",
                                     description="Build (or check) the moe_tut CUDA INT4 extension from csrc/.")
    parser.add_argument("--build", action="store_true", help="build now (or load the cached build) and say where")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and full output")
    args = parser.parse_args(argv)
    print(f"sources: {CSRC} ({', '.join(SOURCES)}); build cache: {build_root()}")
    print("targets: " + (f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if not gencode_flags()
                         else ", ".join(f"sm_{a}" for a in TARGET_ARCHS) + f" + compute_{PTX_ARCH} PTX"))
    if not args.build:
        problem = toolchain_problem()
        print(f"toolchain: {problem or 'ok'}; run with --build to build")
        return 1 if problem else 0
    try:
        module = load_extension(verbose=args.verbose)
    except BackendUnavailable as exc:
        print(str(exc), file=sys.stderr)
        if exc.__cause__ is not None and args.verbose:
            print(str(exc.__cause__), file=sys.stderr)
        return 1
    print(f"built: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compilation of Triton kernels for NVIDIA targets on a machine without a GPU (Triton ships
ptxas), shared by the kernel tests. The compile runs in a subprocess with the interpreter off, because
`import moe_tut` turns the interpreter on when there is no CUDA device.

In the subprocess: `from aot import compile_kernel` (the script's sys.path gets this folder).
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def compile_kernel(fn, const: dict, ptr_types: dict, unit_strides, aligned, cc: int, num_warps: int,
                   num_stages: int, maxnreg: int | None = None):
    """Compile the JIT function `fn` for sm_`cc`, specialised as the JIT would be on aligned inputs.

    const        constexpr values by argument name (completed here with the unit strides, = 1, and the
                 defaults of constexpr arguments not given, e.g. USE_PDL=False, as a launch would)
    ptr_types    Triton pointer type by argument name; other `*_ptr` arguments are "*i32"
    unit_strides arguments that are 1 (constexpr, as the JIT specialises them)
    aligned      arguments divisible by 16 (pointers and strides of contiguous tensors)
    maxnreg      the launch's register cap, if any
    """
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    const, sig = dict(const), {}
    defaults = inspect.signature(fn.fn).parameters
    for p in fn.params:
        if p.is_constexpr and p.name not in const and defaults[p.name].default is not inspect.Parameter.empty:
            const[p.name] = defaults[p.name].default
    for n in fn.arg_names:
        if n in ptr_types:
            sig[n] = ptr_types[n]
        elif n.endswith("_ptr"):
            sig[n] = "*i32"
        elif n in unit_strides:
            sig[n], const[n] = "constexpr", 1
        elif n in const:
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton_compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages,
                                       **({} if maxnreg is None else dict(maxnreg=maxnreg))))


def run_aot_script(script: str) -> list[dict]:
    """Run `script` (which prints one JSON list as its last line) with the interpreter off; its records."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + script
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

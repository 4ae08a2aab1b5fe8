"""Where are we running: GPU facts, or the CPU with Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is *defined* (at `@triton.jit`), so on a machine without
CUDA `use_interpreter_if_no_gpu()` must run before any module that defines kernels is imported.
`moe_tut/__init__.py` calls it first thing, so `import moe_tut` is enough.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device `index`, asked once."""
    return torch.cuda.get_device_capability(index)


@contextlib.contextmanager
def environment(values: dict[str, str], clear: Iterable[str] = ()) -> Iterator[None]:
    """Inside the block: the variables named in `clear` unset, then `values` set. After it, every variable
    touched has its old value again (or is unset, as it was). For benchmarks that compare settings."""
    names = set(clear) | set(values)
    saved = {name: os.environ.get(name) for name in names}
    for name in clear:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """$name, stripped: one of `choices`, the first when unset or empty; else a ValueError that names the variable."""
    value = os.environ.get(name, "").strip() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")
    return value


def env_parsed(name: str, parse: Callable[[str], T]) -> T | None:
    """parse($name stripped), or None when unset or blank; parse's ValueError comes back naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{name}={text!r}: {exc}") from None


PDL_ENV = "MOE_TUT_PDL"


def programmatic_launch_enabled() -> bool:
    """$MOE_TUT_PDL: "1" (or unset) lets the decode kernels use programmatic dependent launch, "0" does not.

    Programmatic dependent launch (Hopper and newer) lets a kernel's blocks start while the previous kernel on
    the stream finishes; each kernel waits for its predecessor's results before reading them, so results are
    the same bits either way. Read on every call, so a benchmark can switch it between graph captures.
    """
    value = os.environ.get(PDL_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{PDL_ENV}={value!r} must be 0 (off) or 1 (on, the default)")
    return value == "1"


def programmatic_launch_ok(device: torch.device) -> bool:
    """Whether kernels on `device` should use programmatic dependent launch: enabled ($MOE_TUT_PDL), a CUDA
    device of compute capability 9.0 or newer, and not Triton's CPU interpreter."""
    if not programmatic_launch_enabled() or interpreting() or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_capability(index)[0] >= 9


def default_device() -> torch.device:
    return torch.device("cuda") if has_cuda() else torch.device("cpu")


def use_interpreter_if_no_gpu() -> bool:
    """Turn on Triton's CPU interpreter when there is no GPU; returns whether it is on."""
    if not has_cuda():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if interpreting():
        patch_interpreter_bf16_dot()
        patch_interpreter_scalar_index()
    return interpreting()


def patch_interpreter_bf16_dot() -> bool:
    """Make the interpreter's `tl.dot` correct for bf16 operands.

    The interpreter keeps bf16 as raw uint16 and multiplies the bit patterns (triton-lang/triton
    issue 11584): results are off by ~1e9. We upcast bf16 operands to float32 before its numpy
    matmul; GPU kernels are not touched. This uses private interpreter API, hence the triton pin.
    """
    if not interpreting():
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_moe_tut_bf16", False):
        return True
    original = builder.create_dot

    def upcast(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    create_dot._moe_tut_bf16 = True
    builder.create_dot = create_dot
    return True


def patch_interpreter_scalar_index() -> bool:
    """Let the interpreter use runtime scalars as `range` bounds with NumPy >= 2.4.

    The interpreter keeps a scalar as a 1-element 1-D array and converts it for `range` with
    `int(array)`, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every loop with a runtime bound (the K loop, the persistent tile loop) fails
    (seen with triton 3.6.0 + numpy 2.4.6). `.item()` accepts any 1-element array. GPU kernels are
    untouched. Private interpreter API, like patch_interpreter_bf16_dot.
    """
    if not interpreting():
        return False
    from triton.runtime import interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_moe_tut_index", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._moe_tut_index = True
    interp._patch_lang_tensor = patch_lang_tensor
    return True


@dataclass
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    capability: str | None = None
    sm_count: int | None = None
    total_memory_gb: float | None = None
    free_memory_gb: float | None = None
    l2_cache_mb: float | None = None
    shared_memory_per_block_kb: float | None = None
    torch_version: str = torch.__version__
    triton_version: str | None = None
    cuda_version: str | None = None
    driver: str | None = None
    python: str = platform.python_version()
    triton_interpreter: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.kind == "cpu":
            return (f"CPU only ({self.name}); Triton kernels run under the interpreter: "
                    "numbers measure correctness runs, not GPU performance")
        return (f"{self.name} (sm_{self.capability}, {self.sm_count} SMs, "
                f"{self.total_memory_gb:.0f} GB, L2 {self.l2_cache_mb:.0f} MB)")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def max_shared_memory_per_block(index: int) -> int | None:
    """The opt-in shared-memory limit per block (what a Triton kernel can use), in bytes."""
    props = torch.cuda.get_device_properties(index)
    for attr in ("shared_memory_per_block_optin", "max_shared_memory_per_block_optin"):
        if hasattr(props, attr):
            return int(getattr(props, attr))
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(index: int | None = None) -> DeviceInfo:
    if not has_cuda():
        return DeviceInfo(kind="cpu", name=platform.processor() or platform.machine(),
                          triton_version=_triton_version(), triton_interpreter=interpreting())
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    smem = max_shared_memory_per_block(index)
    driver = _driver_version()
    return DeviceInfo(
        kind="cuda",
        name=props.name,
        capability=f"{props.major}{props.minor}",
        sm_count=props.multi_processor_count,
        total_memory_gb=total / 1e9,
        free_memory_gb=free / 1e9,
        l2_cache_mb=getattr(props, "L2_cache_size", 0) / 1e6,
        shared_memory_per_block_kb=smem / 1024 if smem else None,
        triton_version=_triton_version(),
        cuda_version=torch.version.cuda,
        driver=driver,
        triton_interpreter=interpreting(),
    )

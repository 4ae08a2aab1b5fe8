"""Launching Triton kernels with less host time: a repeated launch goes straight to the compiled kernel.

An eager MoE forward is 4-7 Triton launches (plan, GEMM1, GEMM2, slot sum). Through Triton's JIT dispatcher
each costs 35-55 us of host time on the H100 machines (binding ~30 arguments, computing the specialisation and
cache key, the grid, the launch metadata), and through an autotuner about 130 us (its key and config merge
on top). At qwen3-30b-a3b T = 1024, whose GPU time is ~0.5 ms, that host time was longer than the GPU's
(results/h100/LOG.md, session 17), so eager timings measured the host.

`launch(fn, grid, args, kwargs)` does what `fn[grid](*args, **kwargs)` does. The first call for a key goes
through Triton (compiling, or autotuning: `fn` may be wrapped by triton.autotune and triton.heuristics) and
remembers the compiled kernel, the config an autotuner chose and the values the heuristics gave. A later call
with the same key hands the argument values to the compiled kernel's launcher directly. The key holds every
non-tensor argument by value, every tensor by dtype and 16-byte alignment, and Triton's debug and instrumentation
knobs: all that Triton specialises a compiled kernel on (and all an autotuner keys on), so a call never reaches a
kernel compiled for other arguments. After MAX_ENTRIES keys nothing more is remembered (no eviction): new keys
then go through Triton every time.

The direct call uses Triton internals (CompiledKernel.run's arguments, JITFunction.signature,
Autotuner.best_config, Heuristics.values), checked on Triton 3.6 only: with another Triton, under the
interpreter, while a launch hook is installed (profilers such as proton), or with MOE_TUT_FAST_LAUNCH=0, every
call goes through `fn[grid]`.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from ..env import interpreting

FAST_LAUNCH_ENV = "MOE_TUT_FAST_LAUNCH"
CHECKED_TRITON = ("3.6",)  # major.minor versions whose internals the direct launch was checked against
MAX_ENTRIES = 4096  # a bound on remembered launches (one per kernel, config and argument key)

_VERSION_OK = ".".join(triton.__version__.split(".")[:2]) in CHECKED_TRITON


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: in Triton 3.6 that is a constexpr function, ~4 us per call from Python."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see cdiv)."""
    return 1 << max(0, n - 1).bit_length()


def fast_launch_enabled() -> bool:
    """Whether launch() may skip Triton's dispatcher: Triton 3.6, a GPU (not the interpreter), no launch hook,
    and MOE_TUT_FAST_LAUNCH not 0."""
    if not _VERSION_OK or interpreting():
        return False
    if os.environ.get(FAST_LAUNCH_ENV, "1").strip() == "0":
        return False
    hooks = triton.knobs.runtime
    return not _has_calls(hooks.launch_enter_hook) and not _has_calls(hooks.launch_exit_hook)


def _has_calls(hook) -> bool:
    if hook is None:
        return False
    return bool(getattr(hook, "calls", True))  # a HookChain with nothing in it calls nothing


class _Entry:
    """One remembered launch: the compiled kernel; the config an autotuner chose (its keywords); the values
    triton.heuristics computed, with their functions; the kernel's parameters after the positional ones, with
    their defaults."""

    __slots__ = ("fn", "kernel", "extra", "heuristics", "positions", "rest")

    def __init__(self, fn, kernel, extra: dict, heuristics: list, positional: list[str], rest: list):
        # fn is kept so that its id, part of the key, is not reused while the entry lives
        self.fn, self.kernel, self.extra, self.heuristics = fn, kernel, extra, heuristics
        self.positions = {name: i for i, name in enumerate(positional)}
        self.rest = rest


_ENTRIES: dict[tuple, _Entry] = {}


def _key(fn, device: int, args: tuple, kwargs: dict) -> tuple:
    # inlined rather than a helper per value: this runs for every argument of every launch
    tensor = torch.Tensor
    knobs = triton.knobs
    return (id(fn), device, knobs.runtime.debug, knobs.compilation.instrumentation_mode,  # compile options too
            tuple([(v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, tensor) else v for v in args]),
            tuple(kwargs),
            tuple([(v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, tensor) else v for v in kwargs.values()]))


def launch(fn, grid, args: tuple, kwargs: dict):
    """fn[grid](*args, **kwargs), through the compiled kernel's launcher when the same key was launched before
    (see the module docstring). fn: a triton.jit function, maybe wrapped by triton.heuristics, then
    triton.autotune. A heuristic is computed on every call; where it answers otherwise than when the kernel was
    remembered (it read something the key does not hold), the call goes through Triton."""
    if not fast_launch_enabled():
        return fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    key = _key(fn, device, args, kwargs)
    entry = _ENTRIES.get(key)
    if entry is None:
        return _first_launch(fn, grid, args, kwargs, key)
    meta = {**kwargs, **entry.extra} if entry.extra else kwargs
    if entry.heuristics:
        meta = _heuristic_values(entry, args, meta)
        if meta is None:  # a heuristic read more than the key holds and now answers otherwise
            return fn[grid](*args, **kwargs)
    kernel = entry.kernel
    g = grid(meta) if callable(grid) else grid
    values = [*args, *[meta.get(name, default) for name, default in entry.rest]]
    hooks = triton.knobs.runtime
    kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
               driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None,
               hooks.launch_enter_hook, hooks.launch_exit_hook, *values)
    return kernel


class _Named(dict):
    """What a heuristic reads: meta's entries and, on a miss, the positional arguments by name (built on demand
    rather than as a whole name -> value dict on every call)."""

    def __missing__(self, name):
        try:
            return self.args[self.positions[name]]
        except (KeyError, IndexError):
            raise KeyError(name) from None


def _heuristic_values(entry: _Entry, args: tuple, meta: dict) -> dict | None:
    """meta with the heuristics' values, computed as triton.heuristics does; None where one differs from the value
    the remembered kernel was compiled with."""
    named = _Named(meta)
    named.args, named.positions = args, entry.positions
    for name, heuristic, value in entry.heuristics:
        named[name] = heuristic(named)
        if named[name] != value:
            return None
    return named


def _first_launch(fn, grid, args: tuple, kwargs: dict, key: tuple):
    kernel = fn[grid](*args, **kwargs)
    if hasattr(kernel, "result"):  # an asynchronous compile
        kernel = kernel.result()
    inner, extra = fn, {}
    if isinstance(inner, Autotuner):
        config = inner.best_config
        if config is None or config.pre_hook is not None:
            return kernel
        inner, extra = inner.fn, config.all_kwargs()
    heuristic_fns = []
    while isinstance(inner, Heuristics):  # outermost first, as they run
        heuristic_fns.extend(inner.values.items())
        inner = inner.fn
    if not isinstance(inner, JITFunction) or kernel is None or not hasattr(kernel, "packed_metadata"):
        return kernel
    named = {**dict(zip(inner.arg_names, args)), **kwargs, **extra}
    heuristics = []
    for name, heuristic in heuristic_fns:
        named[name] = heuristic(named)
        heuristics.append((name, heuristic, named[name]))
    params = list(inner.signature.parameters.values())[len(args):]
    if any(p.default is inspect.Parameter.empty and p.name not in named for p in params) \
            or len(_ENTRIES) >= MAX_ENTRIES:
        return kernel
    rest = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    _ENTRIES[key] = _Entry(fn, kernel, extra, heuristics, inner.arg_names[:len(args)], rest)
    return kernel


def clear() -> None:
    """Forget every remembered launch (tests; the next call of each key goes through Triton again)."""
    _ENTRIES.clear()

"""Launching Triton kernels with less host time: a repeated launch goes straight to the compiled kernel.

An eager MoE forward is 4-7 Triton launches (plan, GEMM1, GEMM2, slot sum). Through Triton's JIT dispatcher
each costs 35-55 us of host time on the H100 machines (binding ~30 arguments, computing the specialisation and
cache key, the grid, the launch metadata), and through an autotuner about 130 us (its key and config merge
on top). At qwen3-30b-a3b T = 1024, whose GPU time is ~0.5 ms, that host time was longer than the GPU's
(results/h100/LOG.md, session 17), so eager timings measured the host.

`launch(fn, grid, args, kwargs)` does what `fn[grid](*args, **kwargs)` does. The first call for a key goes
through Triton (compiling, or autotuning: `fn` may be wrapped by triton.autotune and triton.heuristics) and
remembers the compiled kernel, the config an autotuner chose and the values the heuristics gave. A later call
with the same key hands the argument values to the compiled kernel's launcher directly. Where every heuristic read
only what the key holds by value (our GEMMs' EVEN_K, GROUPS_PER_TILE), nothing after the positional arguments is
rebuilt either: the remembered values are used, with that call's keyword tensors put in (~1-2.5 us less per launch
on the CPU machine, results/h100/LOG.md session 18). The key holds every non-tensor argument by value, every
tensor by dtype and 16-byte alignment, and Triton's debug and instrumentation knobs: all that Triton specialises a
compiled kernel on (and all an autotuner keys on), so a call never reaches a kernel compiled for other arguments.
After MAX_ENTRIES keys nothing more is remembered (no eviction): new keys then go through Triton every time.

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
    their defaults.

    Where every heuristic read only what the key holds by value (dynamic False), a later call's arguments after the
    positional ones are `constants` with the keyword tensors put in at `tensor_kwargs` (position, name), and the
    grid sees `grid_meta` (the non-tensor keywords, the config and the heuristics' values); otherwise they are
    rebuilt from the call, the heuristics computed again."""

    __slots__ = ("fn", "kernel", "extra", "heuristics", "positions", "rest", "dynamic", "constants",
                 "tensor_kwargs", "grid_meta")

    def __init__(self, fn, kernel, extra: dict, heuristics: list, positional: list[str], rest: list,
                 dynamic: bool, named: dict, kwargs: dict):
        # fn is kept so that its id, part of the key, is not reused while the entry lives
        self.fn, self.kernel, self.extra, self.heuristics = fn, kernel, extra, heuristics
        self.positions = {name: i for i, name in enumerate(positional)}
        self.rest = rest
        self.dynamic = dynamic
        self.constants, self.tensor_kwargs, self.grid_meta = [], [], {}
        if dynamic:
            return
        tensor = torch.Tensor
        for j, (name, default) in enumerate(rest):
            if isinstance(kwargs.get(name), tensor):  # this call's tensor, never kept
                self.tensor_kwargs.append((len(positional) + j, name))
                self.constants.append(None)
            else:
                self.constants.append(named.get(name, default))
        self.grid_meta = {k: v for k, v in kwargs.items() if not isinstance(v, tensor)}
        self.grid_meta.update(extra)
        self.grid_meta.update((name, value) for name, _, value in heuristics)


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
    triton.autotune. A heuristic that read only what the key holds by value is not computed again; one that read
    more (a tensor) is computed on every call, and where it answers otherwise than when the kernel was remembered,
    the call goes through Triton. grid(meta), where callable, is given the keyword arguments (on a direct launch
    those that are not tensors), the autotuner's config and the heuristics' values."""
    if not fast_launch_enabled():
        return fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    key = _key(fn, device, args, kwargs)
    entry = _ENTRIES.get(key)
    if entry is None:
        return _first_launch(fn, grid, args, kwargs, key)
    if entry.dynamic:
        meta = {**kwargs, **entry.extra} if entry.extra else kwargs
        if entry.heuristics:
            meta = _heuristic_values(entry, args, meta)
            if meta is None:  # a heuristic read more than the key holds and now answers otherwise
                return fn[grid](*args, **kwargs)
        g = grid(meta) if callable(grid) else grid
        values = [*args, *[meta.get(name, default) for name, default in entry.rest]]
    else:  # everything after the positional arguments is fixed by the key, but the keyword tensors
        values = [*args, *entry.constants]
        for i, name in entry.tensor_kwargs:
            values[i] = kwargs[name]
        g = grid(entry.grid_meta) if callable(grid) else grid
    kernel = entry.kernel
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
    heuristics, dynamic = _first_heuristics(heuristic_fns, named)
    params = list(inner.signature.parameters.values())[len(args):]
    if any(p.default is inspect.Parameter.empty and p.name not in named for p in params) \
            or len(_ENTRIES) >= MAX_ENTRIES:
        return kernel
    rest = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    _ENTRIES[key] = _Entry(fn, kernel, extra, heuristics, inner.arg_names[:len(args)], rest, dynamic, named, kwargs)
    return kernel


def _first_heuristics(heuristic_fns: list, named: dict) -> tuple[list, bool]:
    """Run the heuristics in order on `named` (the arguments by name; each value is added to it), as
    triton.heuristics does. Returns [(name, function, value)] and whether any of them is dynamic: read a tensor
    (which the key holds only by dtype and alignment), a dynamic heuristic's value, or iterated over the arguments
    while a tensor was among them."""
    reads = _Reads(named)
    fixed = {name for name, v in named.items() if not isinstance(v, torch.Tensor)}  # held by value in the key
    heuristics = []
    for name, heuristic in heuristic_fns:
        reads.read.clear()
        value = heuristic(reads)
        named[name] = reads[name] = value
        heuristics.append((name, heuristic, value))
        if reads.read <= fixed:
            fixed.add(name)
    return heuristics, any(name not in fixed for name, _, _ in heuristics)


class _Reads(dict):
    """The arguments given to heuristics, noting which names one reads (all of them where it iterates)."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.read: set = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)

    def __contains__(self, name):
        self.read.add(name)
        return super().__contains__(name)

    def _reads_all(method):  # noqa: N805  (a decorator used in the class body)
        def read_all(self):
            self.read.update(dict.keys(self))
            return method(self)

        return read_all

    __iter__ = _reads_all(dict.__iter__)
    keys = _reads_all(dict.keys)
    values = _reads_all(dict.values)
    items = _reads_all(dict.items)
    del _reads_all


def clear() -> None:
    """Forget every remembered launch (tests; the next call of each key goes through Triton again)."""
    _ENTRIES.clear()

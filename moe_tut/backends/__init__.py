"""The backend registry: each backend is one row of the results table.

Later backends (triton, triton_int4, cuda_int4) add themselves with `register(...)` in their own
module and appear in the CLI, the harness and the notebooks without touching them.
"""

from __future__ import annotations

from .base import Backend, BackendUnavailable, check_inputs, combine
from .bmm import bmm_extra_bytes, bmm_forward
from .fp32_reference import reference_extra_bytes, reference_forward
from .grouped_mm import grouped_mm_extra_bytes, grouped_mm_forward, grouped_mm_unavailable
from .naive import naive_extra_bytes, naive_forward

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(_REGISTRY)}") from None


def list_backends() -> list[str]:
    return list(_REGISTRY)


def default_backends() -> list[str]:
    """Backends the benchmark runs when none are named: all but the float32 reference and the
    numbered kernel versions (those are for side-by-side version plots)."""
    return [n for n, b in _REGISTRY.items() if not {"reference", "triton-version"} & set(b.tags)]


register(Backend("naive", naive_forward, "Python loop: one GEMM pair per expert",
                 extra_bytes=naive_extra_bytes, graph_safe=False))
register(Backend("bmm", bmm_forward, "pad every expert to the busiest, torch.bmm",
                 extra_bytes=bmm_extra_bytes, graph_safe=False))
register(Backend("grouped_mm", grouped_mm_forward, "torch._grouped_mm over expert offsets",
                 extra_bytes=grouped_mm_extra_bytes, unavailable=grouped_mm_unavailable))
register(Backend("reference", reference_forward, "float32 ground truth, one expert at a time",
                 extra_bytes=reference_extra_bytes, graph_safe=False, tags=("reference",)))

__all__ = ["Backend", "BackendUnavailable", "check_inputs", "combine", "register", "get_backend",
           "list_backends", "default_backends"]

from . import triton_backend  # noqa: E402,F401  (registers "triton"; safe without triton installed)
from .cuda_int4 import cuda_int4_forward  # noqa: E402,F401  (registers "cuda_int4"; the import never builds or fails)
from .triton_int4 import moe_forward_triton_int4  # noqa: E402,F401  (registers "triton_int4"; safe without triton)

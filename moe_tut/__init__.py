"""moe_tut: a tutorial, benchmark and kernels for fast Mixture-of-Experts expert layers.

Importing it on a machine without CUDA turns on Triton's CPU interpreter first (it must be on before
any kernel is defined), so the whole package runs on the CPU on small shapes.
"""

from .env import use_interpreter_if_no_gpu

use_interpreter_if_no_gpu()

from .backends import get_backend, list_backends, register  # noqa: E402
from .hf import PatchReport, patch_moe_experts, unpatch_moe_experts  # noqa: E402  (imports transformers only when called)
from .presets import PRESETS, MoEConfig, custom, get_preset, resolve  # noqa: E402
from .reference import moe_reference, relative_error  # noqa: E402
from .routing import RoutingPlan, RoutingStats, simulate_routing  # noqa: E402
from .weights import ExpertWeights  # noqa: E402

__version__ = "0.1.0"

__all__ = ["PRESETS", "MoEConfig", "custom", "get_preset", "resolve", "RoutingPlan", "RoutingStats",
           "simulate_routing", "ExpertWeights", "moe_reference", "relative_error", "get_backend",
           "list_backends", "register", "patch_moe_experts", "unpatch_moe_experts", "PatchReport"]

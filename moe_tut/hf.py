"""moe_tut inside Hugging Face transformers models: swap a backend into the MoE experts modules, and undo it.

    import moe_tut.hf as mhf
    report = mhf.patch_moe_experts(model, "triton")   # or "triton_int4", "cuda_int4", "naive", "bmm", "grouped_mm"
    print(report)                                      # what was patched; for INT4 the memory saved vs bf16
    with torch.no_grad():
        logits = model(input_ids).logits
    mhf.unpatch_moe_experts(model)                     # the original forward (and bf16 weights) back

What is replaced. In transformers 5.x every supported model keeps its routed experts in one module
(MixtralExperts, Qwen3MoeExperts, DeepseekV3Experts, Glm4MoeExperts) holding

    gate_up_proj [E, 2F, H]  gate rows 0..F-1, up rows F..2F-1   (= moe_tut's w13)
    down_proj    [E, H, F]                                        (= moe_tut's w2)

and computing forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H] as
sum_j w_j * down @ (silu(gate @ x) * (up @ x)): exactly moe_tut's computation and layout, so the
parameters are handed to a backend as they are (ExpertWeights of the parameters themselves: no copy).
Only that module's forward is replaced (an instance attribute shadowing the class's), so the router,
shared experts (DeepSeek-V3, GLM-4.5), attention and everything else run as before, and parameter
names (state_dict keys) do not change. Each call builds a RoutingPlan from the router's top_k_index /
top_k_weights (any float dtype; the plan keeps the weights in float32) and runs the backend.

INT4 (triton_int4, cuda_int4): the experts' bf16 parameters are quantised once (moe_tut.quant, RTN,
group-wise, symmetric by default), the packed codes and scales are kept as non-persistent buffers of
the experts module, and gate_up_proj / down_proj are replaced by empty parameters, so the bf16 memory
is really released (unless something else still holds the old tensors). The report gives the
parameter and buffer bytes before and after, against the bf16 baseline.

Undo: unpatch_moe_experts(model). bf16 backends: the original forward comes back; the weights were never
touched. INT4: with keep_bf16_copy=True the original bf16 parameters (the same Parameter objects) are
kept in host memory and restored bit for bit; by default they are not kept, and unpatching restores
bf16 parameters DEQUANTISED from the INT4 weights (what the INT4 kernels computed with, not the original
values). The PatchReport's `undo` line says which.

Limits, stated up front: inference only (the kernels have no backward; a forward with autograd
recording raises); bf16 experts only; SiLU-gated experts only; expert ids must lie in [0, E) (true for
the routers of the supported models; expert-parallel sentinels are not supported). On a GPU the
patched forward has no host sync, so a patched block can be captured in a CUDA graph (with a graph-safe
backend). On the CPU the ids are checked (a cheap host-side check there).

transformers is imported only when one of these functions runs, so `import moe_tut` does not need it.
The notebook helpers at the end (tiny_model, build_moe_block, compare_block, plot_block_times) serve
notebooks/07_real_models.ipynb, scripts/gpu_hf_bench.py and tests/test_hf.py.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backends import Backend, BackendUnavailable, get_backend
from .presets import MoEConfig, custom
from .quant import DEFAULT_GROUP_SIZE, Int4ExpertWeights, QuantizedTensor, check_quantizable
from .reference import relative_error
from .routing import RoutingPlan
from .weights import ExpertWeights

GB = 1e9
TRANSFORMERS_REQUIREMENT = "transformers>=5.0,<6"
# model_type -> (module, experts class, MoE block class, name for messages)
SUPPORTED_MODELS = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts", "MixtralSparseMoeBlock",
                "Mixtral"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeSparseMoeBlock",
                  "Qwen3-MoE"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts", "DeepseekV3MoE",
                    "DeepSeek-V3"),
    "glm4_moe": ("transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeExperts", "Glm4MoeMoE",
                 "GLM-4.5 (Glm4Moe)"),
}
PATCH_BACKENDS = ("triton", "triton_int4", "cuda_int4", "naive", "bmm", "grouped_mm")
PATCH_DTYPE = torch.bfloat16
_STATE = "_moe_tut_patch"  # attribute of a patched experts module holding its _PatchState
_INT4_BUFFERS = ("w13_packed", "w13_scales", "w13_zeros", "w2_packed", "w2_scales", "w2_zeros")
_BUFFER_PREFIX = "moe_tut_"


def supported_models() -> str:
    """One line naming what patch_moe_experts supports (used in error messages)."""
    return ", ".join(f"{name} ({cls}, model_type {mt!r})" for mt, (_, cls, _, name) in SUPPORTED_MODELS.items())


def require_transformers():
    """Import transformers, or say how to install it; refuse 4.x (its experts were per-expert nn.Linear)."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"moe_tut.hf needs Hugging Face transformers: pip install '{TRANSFORMERS_REQUIREMENT}' "
                          "(or pip install -e '.[hf]' in a moe_tut checkout)") from exc
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"moe_tut.hf needs {TRANSFORMERS_REQUIREMENT}: transformers {transformers.__version__} "
                          "stores experts as one nn.Linear per expert, not the stacked [E, 2F, H] tensors it patches")
    return transformers


def _supported_classes() -> dict[type, str]:
    """Experts class -> model_type, for the supported models this transformers has."""
    require_transformers()
    out = {}
    for model_type, (module, cls_name, _, _) in SUPPORTED_MODELS.items():
        try:
            out[getattr(importlib.import_module(module), cls_name)] = model_type
        except (ImportError, AttributeError):
            continue
    return out


def _block_class(model_type: str) -> type:
    require_transformers()
    module, _, block, _ = SUPPORTED_MODELS[model_type]
    return getattr(importlib.import_module(module), block)


def _looks_like_experts(module: nn.Module) -> bool:
    """An MoE experts module of some model (supported or not): named *Experts, or stacked 3-D expert weights."""
    if type(module).__name__.endswith("Experts"):
        return True
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3


def find_moe_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every supported experts module in `model` (the model itself included).

    Raises ValueError, naming what is supported, when there is none, or when the model also has experts
    modules of an unsupported kind (patching only some of a model's experts would be a silent half-patch).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_moe_experts needs a torch.nn.Module (a transformers model or MoE block), got "
                        f"{type(model).__name__}")
    classes = _supported_classes()
    found, other = [], []
    for name, module in model.named_modules():
        if type(module) in classes:
            found.append((name, module))
        elif _looks_like_experts(module):
            other.append(f"{name or '(the model itself)'}: {type(module).__name__}")
    what = f"{type(model).__name__}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        what += f" (model_type {model_type!r})"
    if other:
        raise ValueError(f"{what} has MoE experts moe_tut.hf does not support ({'; '.join(other[:3])}"
                         f"{'; ...' if len(other) > 3 else ''}). Supported: {supported_models()}.")
    if not found:
        raise ValueError(f"{what} has no MoE experts module moe_tut.hf can patch. Supported: {supported_models()}.")
    return found


def _silu_like(act: object) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return False
    return isinstance(act, SiLUActivation)


def _check_module(name: str, module: nn.Module) -> None:
    """Everything about one experts module that must hold before it is patched (nothing is changed here)."""
    where = f"{name or 'the model'} ({type(module).__name__})"
    if hasattr(module, _STATE):
        raise ValueError(f"{where} is already patched with backend {getattr(module, _STATE).backend.name!r}; "
                         "call moe_tut.hf.unpatch_moe_experts(model) first")
    act = getattr(module, "act_fn", None)
    if not _silu_like(act):
        hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
        raise ValueError(f"{where} uses activation {hidden_act or type(act).__name__!r}; moe_tut's kernels compute "
                         "SiLU-gated experts (silu(gate) * up) only")
    flags = dict(is_transposed=False, has_bias=False, has_gate=True, is_concatenated=True)
    bad = {k: getattr(module, k) for k, want in flags.items() if getattr(module, k, want) != want}
    if bad:
        raise ValueError(f"{where} has {bad}; moe_tut needs gate_up_proj [E, 2F, H] (gate rows first, then up), "
                         "down_proj [E, H, F], no biases")
    for pname in ("gate_up_proj", "down_proj"):
        p = getattr(module, pname, None)
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{where} has no tensor {pname}")
        if p.device.type == "meta":
            raise ValueError(f"{where}.{pname} is on the meta device (not loaded); load the weights first")
        if p.dtype != PATCH_DTYPE:
            raise TypeError(f"{where}.{pname} is {p.dtype}; moe_tut.hf patches bfloat16 experts (the dtype its "
                            "kernels are built and tested for): model.to(torch.bfloat16) first")
    ExpertWeights(module.gate_up_proj.detach(), module.down_proj.detach())  # shape / device checks


def _top_k(module: nn.Module) -> int:
    k = getattr(getattr(module, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) and 0 < k <= module.gate_up_proj.shape[0] else 1


def _check_backend(backend: Backend, module: nn.Module, group_size: int) -> None:
    """BackendUnavailable (with the registry's reason) or a clear error for this module's shape."""
    E, two_f, H = module.gate_up_proj.shape
    F, device = two_f // 2, module.gate_up_proj.device
    if backend.weight_format != "int4":
        backend.check_available(custom(E, H, F, _top_k(module)), device)
        return
    # The registry's unavailable() also checks prepare()'s fixed group size (128) against H and F. Here the
    # group size is the caller's: the registry is asked only about the device and toolchain (with a shape
    # its group size divides), and the caller's group size is checked against the real H and F.
    backend.check_available(custom(E, DEFAULT_GROUP_SIZE, DEFAULT_GROUP_SIZE, _top_k(module)), device)
    check_quantizable(module.gate_up_proj, group_size, "gate_up_proj", "H")
    check_quantizable(module.down_proj, group_size, "down_proj", "F")
    if backend.name == "triton_int4":
        from .kernels.int4_gemm import check_group_size  # importable: check_available passed

        check_group_size(group_size)


@dataclass
class _PatchState:
    backend: Backend
    num_experts: int
    hidden_size: int
    group_size: int | None = None
    symmetric: bool | None = None
    kept_bf16: tuple[nn.Parameter, nn.Parameter] | None = None  # INT4 with keep_bf16_copy: the originals
    bf16_device: torch.device | None = None
    bf16_requires_grad: tuple[bool, bool] = (False, False)

    @property
    def int4(self) -> bool:
        return self.backend.weight_format == "int4"


def _buffer(module: nn.Module, name: str) -> torch.Tensor | None:
    return module._buffers.get(_BUFFER_PREFIX + name)


def expert_weights(module: nn.Module) -> ExpertWeights | Int4ExpertWeights:
    """The weights a (patched or not) supported experts module computes with, as moe_tut weight objects.

    bf16: ExpertWeights whose w13 / w2 ARE the module's gate_up_proj / down_proj (same storage, no copy).
    INT4-patched: Int4ExpertWeights over the module's packed buffers (again no copy).
    """
    state = getattr(module, _STATE, None)
    if state is None or not state.int4:
        return ExpertWeights(module.gate_up_proj.detach(), module.down_proj.detach())
    E, H = state.num_experts, state.hidden_size
    F = _buffer(module, "w2_packed").shape[2] * 2
    scales = _buffer(module, "w13_scales")
    if scales.dtype != torch.bfloat16:
        raise TypeError(f"the INT4 scales of this experts module are {scales.dtype}, not bfloat16 (the model's dtype "
                        "was changed after patching?); unpatch_moe_experts before changing dtypes")
    G, sym = state.group_size, state.symmetric
    w13 = QuantizedTensor(_buffer(module, "w13_packed"), _buffer(module, "w13_scales"), _buffer(module, "w13_zeros"),
                          G, sym, (E, 2 * F, H))
    w2 = QuantizedTensor(_buffer(module, "w2_packed"), _buffer(module, "w2_scales"), _buffer(module, "w2_zeros"),
                         G, sym, (E, H, F))
    return Int4ExpertWeights(w13, w2, PATCH_DTYPE)


def patched_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts forward with a moe_tut backend: same arguments and result as the transformers one."""
    state: _PatchState = getattr(self, _STATE)
    weights = expert_weights(self)
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.gate_up_proj.requires_grad):
        raise RuntimeError("moe_tut's kernels compute the forward only (no backward): run the patched model under "
                           "torch.no_grad() or torch.inference_mode(), or call moe_tut.hf.unpatch_moe_experts(model) "
                           "to train")
    if hidden_states.dtype != weights.dtype:
        raise TypeError(f"hidden states reaching the experts are {hidden_states.dtype} but the patched experts compute "
                        f"in {weights.dtype} (autocast or a dtype change after patching?); run the model in "
                        f"{weights.dtype}")
    x = hidden_states.reshape(-1, state.hidden_size)
    ids = top_k_index.reshape(x.shape[0], -1)
    plan = RoutingPlan.build(ids, top_k_weights.reshape(ids.shape), state.num_experts,
                             validate=ids.device.type == "cpu",  # a host sync on a GPU: skipped there
                             defer=True)  # sorted only if the backend reads it (cuda_int4 decodes one token without)
    with torch.no_grad():
        y = state.backend(x, weights, plan)
    return y.view(hidden_states.shape)


def format_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as the rest of moe_tut)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of `model` (shared tensors counted once)."""
    return _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers())


@dataclass(frozen=True)
class PatchReport:
    """What patch_moe_experts did. Byte counts are of parameters and buffers; the baseline is bf16."""

    model: str  # class name of what was patched
    model_type: str
    backend: str
    weight_format: str  # "bf16" (the model's own tensors) or "int4"
    modules: tuple[str, ...]  # names of the patched experts modules
    experts_per_module: int
    expert_bytes_before: int  # the patched modules' weights, bf16
    expert_bytes_after: int  # the same weights as the backend holds them
    model_bytes_before: int  # every parameter and buffer of the model
    model_bytes_after: int
    host_copy_bytes: int  # bf16 originals kept for unpatch (keep_bf16_copy)
    group_size: int | None
    symmetric: bool | None
    undo: str

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    @property
    def saved_bytes(self) -> int:
        return self.expert_bytes_before - self.expert_bytes_after

    @property
    def compression_vs_bf16(self) -> float:
        """How many times smaller the patched experts' weights are than in bf16 (1.0 for bf16 backends)."""
        return self.expert_bytes_before / self.expert_bytes_after if self.expert_bytes_after else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "num_modules": self.num_modules, "saved_bytes": self.saved_bytes,
                "compression_vs_bf16": self.compression_vs_bf16}

    def __str__(self) -> str:
        lines = [f"patched {self.num_modules} experts module(s) of {self.model} ({self.model_type}, "
                 f"{self.experts_per_module} experts each) with moe_tut backend {self.backend!r}"]
        if self.weight_format == "int4":
            kind = "symmetric" if self.symmetric else "asymmetric"
            lines.append(f"expert weights: {format_bytes(self.expert_bytes_before)} in bf16 -> "
                         f"{format_bytes(self.expert_bytes_after)} in INT4 (group {self.group_size}, {kind}): "
                         f"{self.compression_vs_bf16:.2f}x smaller than bf16, {format_bytes(self.saved_bytes)} saved")
            lines.append(f"whole {self.model} (parameters + buffers): {format_bytes(self.model_bytes_before)} -> "
                         f"{format_bytes(self.model_bytes_after)}")
        else:
            lines.append(f"expert weights: {format_bytes(self.expert_bytes_before)} in bf16, used in place (no copy)")
        lines.append(f"undo: {self.undo}")
        return "\n".join(lines)


def patch_moe_experts(model: nn.Module, backend: str = "triton", *, group_size: int = DEFAULT_GROUP_SIZE,
                      symmetric: bool = True, keep_bf16_copy: bool = False) -> PatchReport:
    """Run every MoE experts module of `model` with moe_tut backend `backend`; returns a PatchReport.

    model           a transformers model of a supported type (supported_models()), or any module containing
                    their experts modules (e.g. one MoE block), in bfloat16
    backend         one of PATCH_BACKENDS: "triton", "grouped_mm", "naive", "bmm" compute with the model's own
                    bf16 parameters (no copy); "triton_int4", "cuda_int4" quantise them to INT4 first
    group_size      INT4 only: values per scale along the reduction dim (must divide H and F)
    symmetric       INT4 only: symmetric (default) or asymmetric (with zero points) quantisation
    keep_bf16_copy  INT4 only: keep the original bf16 parameters in host memory so unpatch_moe_experts
                    restores them exactly; without it (default) unpatching restores dequantised values

    Every check (supported model, SiLU, dtype, shapes, group size, backend availability) runs on every
    module before anything is changed. Raises ValueError for an unsupported model or unknown backend,
    BackendUnavailable (with the reason) for a backend that cannot run on the experts' device, TypeError
    for experts that are not bf16.
    """
    if backend not in PATCH_BACKENDS:
        raise ValueError(f"backend {backend!r} cannot be patched into a model; choose one of "
                         f"{', '.join(PATCH_BACKENDS)}")
    b = get_backend(backend)
    int4 = b.weight_format == "int4"
    found = find_moe_experts(model)
    for name, module in found:
        _check_module(name, module)
    for name, module in found:
        try:
            _check_backend(b, module, group_size)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name or 'the model'} ({type(module).__name__}): {exc}") from exc
    model_before = module_bytes(model)
    experts_per_module = found[0][1].gate_up_proj.shape[0]
    bytes_before = bytes_after = host = 0
    done: list[nn.Module] = []
    try:
        for _, module in found:
            before, after, kept = _patch_one(module, b, group_size, symmetric, keep_bf16_copy and int4)
            bytes_before, bytes_after, host = bytes_before + before, bytes_after + after, host + kept
            done.append(module)
    except BaseException as exc:
        for module in done:  # leave the model as it was (as far as it can be: see the note)
            _unpatch_one(module)
        if done and int4 and not keep_bf16_copy:
            exc.add_note(f"moe_tut.hf: the {len(done)} experts module(s) quantised before this error were restored "
                         "from their INT4 weights (dequantised bf16, not the original values; keep_bf16_copy=True "
                         "keeps the originals)")
        raise
    first = found[0][1]
    model_type = getattr(getattr(first, "config", None), "model_type", None) or _supported_classes()[type(first)]
    if not int4:
        undo = "unpatch_moe_experts(model) restores the original forward; the bf16 weights were used in place"
    elif keep_bf16_copy:
        undo = (f"unpatch_moe_experts(model) restores the original bf16 parameters exactly, from the copy kept "
                f"in host memory ({format_bytes(host)})")
    else:
        undo = ("unpatch_moe_experts(model) restores bf16 parameters DEQUANTISED from the INT4 weights (the "
                "original values were freed; patch with keep_bf16_copy=True to get them back exactly)")
    return PatchReport(
        model=type(model).__name__, model_type=model_type, backend=backend, weight_format=b.weight_format,
        modules=tuple(name for name, _ in found), experts_per_module=experts_per_module,
        expert_bytes_before=bytes_before, expert_bytes_after=bytes_after, model_bytes_before=model_before,
        model_bytes_after=module_bytes(model), host_copy_bytes=host,
        group_size=group_size if int4 else None, symmetric=symmetric if int4 else None, undo=undo)


def _patch_one(module: nn.Module, backend: Backend, group_size: int, symmetric: bool, keep: bool
               ) -> tuple[int, int, int]:
    """Patch one (checked) module; returns (bf16 bytes, bytes after, host copy bytes)."""
    w13, w2 = module.gate_up_proj, module.down_proj
    E, _, H = w13.shape
    before = _tensor_bytes((w13, w2))
    state = _PatchState(backend, E, H)
    if backend.weight_format != "int4":
        setattr(module, _STATE, state)
        module.forward = types.MethodType(patched_experts_forward, module)
        return before, before, 0
    # Everything that allocates (and so can fail) first; the module is changed only after it.
    q = Int4ExpertWeights.from_bf16(ExpertWeights(w13.detach(), w2.detach()), group_size, symmetric)
    host = [p.data.to("cpu") for p in (w13, w2)] if keep else None  # a no-op for weights already on the CPU
    state.group_size, state.symmetric = group_size, symmetric
    state.bf16_device = w13.device
    state.bf16_requires_grad = (w13.requires_grad, w2.requires_grad)
    for name, t in zip(_INT4_BUFFERS, (q.w13.packed, q.w13.scales, q.w13.zeros, q.w2.packed, q.w2.scales, q.w2.zeros)):
        if t is not None:
            module.register_buffer(_BUFFER_PREFIX + name, t, persistent=False)
    kept = 0
    if host is not None:
        for p, h in zip((w13, w2), host):
            p.data = h  # the same Parameter object, now holding its values in host memory
            kept += _tensor_bytes((p,))
        state.kept_bf16 = (w13, w2)
    for pname in ("gate_up_proj", "down_proj"):
        setattr(module, pname, nn.Parameter(torch.empty(0, dtype=PATCH_DTYPE, device=state.bf16_device),
                                            requires_grad=False))
    setattr(module, _STATE, state)
    module.forward = types.MethodType(patched_experts_forward, module)
    return before, q.nbytes, kept


def _unpatch_one(module: nn.Module) -> None:
    state: _PatchState | None = getattr(module, _STATE, None)
    if state is None:
        return
    if state.int4:
        if state.kept_bf16 is not None:
            w13, w2 = state.kept_bf16
            device = _buffer(module, "w13_packed").device  # where the module is now (it may have moved)
            for p in (w13, w2):
                p.data = p.data.to(device)
        else:
            deq = expert_weights(module).dequantize()
            w13 = nn.Parameter(deq.w13, requires_grad=state.bf16_requires_grad[0])
            w2 = nn.Parameter(deq.w2, requires_grad=state.bf16_requires_grad[1])
        module.gate_up_proj, module.down_proj = w13, w2
        for name in _INT4_BUFFERS:
            module._buffers.pop(_BUFFER_PREFIX + name, None)
    module.__dict__.pop("forward", None)
    delattr(module, _STATE)


def unpatch_moe_experts(model: nn.Module) -> int:
    """Undo patch_moe_experts on `model`; returns how many experts modules were restored.

    The transformers forward comes back. For INT4 patches the bf16 parameters come back too: the
    originals, exactly, if the patch kept them (keep_bf16_copy=True), else dequantised from the INT4
    weights (see the PatchReport's `undo`). Raises ValueError if nothing in `model` is patched.
    """
    patched = [m for m in model.modules() if hasattr(m, _STATE)]
    if not patched:
        raise ValueError(f"{type(model).__name__} has no experts module patched by moe_tut: nothing to undo")
    for module in patched:
        _unpatch_one(module)
    return len(patched)


def is_patched(model: nn.Module) -> bool:
    return any(hasattr(m, _STATE) for m in model.modules())


# ------------------------------------------------------------------------------------------------------------
# Models and blocks with random weights (no downloads), for tests, the notebook and the GPU benchmark.

ARCHS = tuple(SUPPORTED_MODELS)
# A preset's architecture: published shapes map to their own model; the others run as Mixtral-style blocks.
PRESET_ARCH = {"qwen3-30b-a3b": "qwen3_moe", "deepseek-v3": "deepseek_v3", "glm-4.5": "glm4_moe"}


def arch_for_preset(cfg: MoEConfig) -> str:
    return PRESET_ARCH.get(cfg.name, "mixtral")


def moe_config(arch: str, E: int, H: int, F: int, top_k: int, *, num_layers: int = 1, vocab_size: int = 128,
               experts_implementation: str | None = "eager"):
    """A transformers config of architecture `arch` whose MoE layers have these expert shapes.

    Attention is kept small (4 heads of H/4); DeepSeek-V3 and GLM-4.5 get one shared expert of size F and
    their first layer dense when num_layers > 1 (as the real models, whose first layers are dense), and
    DeepSeek-V3 uses its grouped routing (8 groups, top-4 groups) when E >= 64, else one group.
    experts_implementation: transformers' experts implementation ("eager", "grouped_mm", "batched_mm"); set
    explicitly so that a block built alone does not log a warning (None lets a whole model pick its default).
    """
    if arch not in SUPPORTED_MODELS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    transformers = require_transformers()
    heads = 4
    common = dict(vocab_size=vocab_size, hidden_size=H, num_hidden_layers=num_layers, num_attention_heads=heads,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=top_k, hidden_act="silu")
    if arch == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=F, num_local_experts=E, **common)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=F, intermediate_size=2 * F, num_experts=E,
                                             head_dim=H // heads, norm_topk_prob=True, **common)
    else:
        shared = dict(moe_intermediate_size=F, intermediate_size=2 * F, n_routed_experts=E, n_shared_experts=1,
                      first_k_dense_replace=1 if num_layers > 1 else 0)
        groups = dict(n_group=8, topk_group=4) if E >= 64 and E % 8 == 0 else dict(n_group=1, topk_group=1)
        if arch == "deepseek_v3":
            # MLA: every head has its own keys and values (num_key_value_heads = heads, no GQA).
            config = transformers.DeepseekV3Config(
                **shared, **groups, kv_lora_rank=max(16, H // 8), q_lora_rank=max(16, H // 4), qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, **{**common, "num_key_value_heads": heads})
        else:
            config = transformers.Glm4MoeConfig(**shared, n_group=1, topk_group=1, head_dim=H // heads, **common)
    config._experts_implementation = experts_implementation
    return config


@torch.no_grad()
def realistic_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every matrix with std 1/sqrt(fan_in) (as ExpertWeights.random), in place; norms and biases stay.

    transformers initialises with std 0.02, at which the experts' output is tiny next to the residual
    stream, so a wrong expert computation would hardly show in the logits. At 1/sqrt(fan_in) activations
    stay O(1) through every layer and the experts' part of the output is as large as in a trained model.
    """
    devices = {p.device for p in module.parameters()}
    gens = {d: torch.Generator(device=d).manual_seed(seed) for d in devices}
    for p in module.parameters():
        if p.dim() == 2:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=gens[p.device])
        elif p.dim() == 3:  # stacked experts [E, N, K]: K is the fan-in; one expert at a time
            for e in range(p.shape[0]):
                p[e].normal_(0.0, p.shape[2] ** -0.5, generator=gens[p.device])
    return module


def tiny_model(arch: str = "mixtral", *, num_experts: int = 8, hidden_size: int = 64, ffn_size: int = 64,
               top_k: int = 2, num_layers: int = 2, vocab_size: int = 128, seed: int = 0, device="cpu",
               dtype: torch.dtype = torch.bfloat16, experts_implementation: str | None = None) -> nn.Module:
    """A whole causal LM of `arch` built from transformers' own config class, random weights, eval mode.

    experts_implementation: transformers' own choice when None (grouped_mm where it can run), else
    "eager", "grouped_mm" or "batched_mm".
    """
    transformers = require_transformers()
    config = moe_config(arch, num_experts, hidden_size, ffn_size, top_k, num_layers=num_layers,
                        vocab_size=vocab_size, experts_implementation=experts_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device)
    realistic_init_(model, seed)
    return model.eval()


def build_moe_block(arch: str, cfg: MoEConfig, *, device=None, dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0) -> nn.Module:
    """One sparse-MoE block of `arch` (router + experts, + shared expert for DeepSeek-V3 / GLM-4.5) with
    cfg's E, H, F, top_k, built straight on `device` in `dtype` (no float32 copy), random weights.

    Checks first that it fits (InsufficientMemoryError with what to do otherwise), counting the block's
    experts twice: compare_block's INT4 rows hold one more bf16 copy (the dequantised reference).
    """
    from .bench.memory import check_fits
    from .env import default_device

    device = torch.device(device) if device is not None else default_device()
    check_fits(cfg, [1], device, weight_bytes=2 * cfg.weight_bytes())
    config = moe_config(arch, cfg.E, cfg.H, cfg.F, cfg.top_k)
    block_cls = _block_class(arch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            block = block_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return realistic_init_(block, seed).eval()


# ------------------------------------------------------------------------------------------------------------
# One MoE block: transformers' implementations vs patched moe_tut backends, checked, then timed.

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BLOCK_BACKENDS = ("triton", "grouped_mm", "triton_int4", "cuda_int4")
BF16_TOL = 2e-2  # relative Frobenius error vs the unpatched block (both bf16)
# INT4 vs the bf16 block: the quantisation error, reported, with only a bound that catches a broken path (an
# unrelated output is ~1.4 away). The tight check is the one against the same dequantised weights.
# Measured with moe_tut.reference on random Gaussian weights, (E, H, F) = (4, 512, 1024), (4, 4096, 1024) and
# (8, 2048, 768), 64 tokens: 0.21 relative error of the experts' output at group 128, 0.17 at group 32 (two INT4
# GEMMs in a row, ~12% weight error each at group 128). A single token scatters more: 0.27 was seen at T = 1
# with H = 128, hence the margin.
INT4_LOOSE_TOL = 0.5
GRAPH_MAX_TOKENS = 64  # CUDA-graph replay timing at or below this T (launch overhead is the host's)
# transformers' implementations with no host sync inside, so CUDA-graph capture is possible. eager is not:
# it loops over the experts that received tokens (nonzero + a Python loop over a device tensor).
HF_GRAPH_SAFE = {"grouped_mm", "batched_mm"}


def _single_experts(block: nn.Module) -> nn.Module:
    found = find_moe_experts(block)
    if len(found) != 1:
        raise ValueError(f"compare_block needs one MoE block (one experts module); found {len(found)}")
    return found[0][1]


@contextlib.contextmanager
def _loaded_weights(module: nn.Module, weights: ExpertWeights) -> Iterator[None]:
    """Temporarily compute an (unpatched) experts module with other bf16 weights of the same shape."""
    old = module.gate_up_proj.data, module.down_proj.data
    module.gate_up_proj.data, module.down_proj.data = weights.w13, weights.w2
    try:
        yield
    finally:
        module.gate_up_proj.data, module.down_proj.data = old


def _forward_fn(block: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def fn():
        with torch.no_grad():
            return block(x)

    return fn


def _time(fn: Callable[[], object], device: torch.device, use_graph: bool, cpu_reps: int):
    from .bench.timing import time_cpu, time_cuda

    if device.type != "cuda":
        return time_cpu(fn, reps=cpu_reps), ""
    if use_graph:
        try:
            return time_cuda(fn, use_graph=True), ""
        except RuntimeError as exc:  # e.g. a host sync inside; time without the graph and say why
            torch.cuda.synchronize()
            note = f"graph capture failed ({str(exc).splitlines()[0][:120]}); timed with events"
            return time_cuda(fn), note
    return time_cuda(fn), ""


ROW_KEYS = ("arch", "T", "implementation", "library", "weights", "status", "rel_err", "rel_err_dequant",
            "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "speedup_vs_hf_grouped_mm", "expert_gb", "timing",
            "reason")
_NUMERIC = {"rel_err", "rel_err_dequant", "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager",
            "speedup_vs_hf_grouped_mm", "expert_gb"}


def make_row(**fields) -> dict:
    """A compare_block row: `fields`, and NaN (numbers) or "" (text) for the rest of ROW_KEYS."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row fields {sorted(unknown)}; rows have {', '.join(ROW_KEYS)}")
    return {k: fields.get(k, math.nan if k in _NUMERIC else "") for k in ROW_KEYS}


def compare_block(block: nn.Module, tokens: Sequence[int], backends: Sequence[str] = BLOCK_BACKENDS,
                  hf_implementations: Sequence[str] = HF_IMPLEMENTATIONS, *, group_size: int = DEFAULT_GROUP_SIZE,
                  symmetric: bool = True, seed: int = 0, deadline: float | None = None, cpu_reps: int = 3,
                  progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One MoE block: transformers' experts implementations and patched moe_tut backends, over T tokens.

    For each T (input [1, T, H], seeded): the unpatched block with transformers' eager experts is the
    reference; every other row is first checked against it (bf16: relative error < BF16_TOL; INT4: < BF16_TOL
    against the unpatched block with the same dequantised weights loaded, and < INT4_LOOSE_TOL against bf16)
    and timed only if it passes (status "FAIL" otherwise). Timing: moe_tut.bench.timing (GPU: CUDA events,
    cold L2, median; CUDA-graph replay for T <= GRAPH_MAX_TOKENS where the row is graph-safe. CPU: correctness
    runs, not performance). The block is left unpatched, with eager experts. `deadline` (time.monotonic())
    makes later rows "skipped". Rows are dicts (see ROW_KEYS); `progress` is called with each.
    """
    experts = _single_experts(block)
    config = experts.config
    try:  # transformers' registry of experts implementations (grouped_mm, batched_mm, ...)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        hf_available = set(ALL_EXPERTS_FUNCTIONS.keys())
    except ImportError:
        hf_available = set()

    arch = config.model_type
    H = experts.gate_up_proj.shape[2]
    device, dtype = experts.gate_up_proj.device, experts.gate_up_proj.dtype
    graph_ok = device.type == "cuda"
    rows: list[dict] = []

    def emit(**fields) -> None:
        row = make_row(**fields)
        rows.append(row)
        if progress:
            progress(row)

    deq_cache: dict[tuple, ExpertWeights] = {}
    for T in tokens:
        gen = torch.Generator().manual_seed(seed + T)
        x = torch.randn(1, T, H, generator=gen).to(device=device, dtype=dtype)
        config._experts_implementation = "eager"
        with torch.no_grad():
            ref = block(x)
        base = dict(arch=arch, T=T)
        timed: dict[str, float] = {}
        for impl in hf_implementations:
            row = dict(base, implementation=f"transformers {impl}", library="transformers", weights="bf16",
                       expert_gb=_tensor_bytes((experts.gate_up_proj, experts.down_proj)) / GB)
            if deadline is not None and time.monotonic() > deadline:
                emit(**row, status="skipped", reason="time budget spent")
                continue
            if impl != "eager" and impl not in hf_available:
                emit(**row, status="skipped", reason=f"this transformers has no experts implementation {impl!r}")
                continue
            config._experts_implementation = impl
            try:
                emit(**row, **_check_and_time(block, x, ref, None, False, device,
                                              graph_ok and T <= GRAPH_MAX_TOKENS and impl in HF_GRAPH_SAFE, cpu_reps))
            finally:
                config._experts_implementation = "eager"
            if rows[-1]["status"] == "ok":
                timed[impl] = rows[-1]["median_ms"]
        for name in backends:
            b = get_backend(name)
            int4 = b.weight_format == "int4"
            row = dict(base, implementation=f"moe_tut {name}", library="moe_tut", weights=b.weight_format)
            if deadline is not None and time.monotonic() > deadline:
                emit(**row, status="skipped", reason="time budget spent")
                continue
            try:
                _check_backend(b, experts, group_size)
            except (BackendUnavailable, ValueError) as exc:
                emit(**row, status="skipped", reason=str(exc))
                continue
            ref_deq = None
            if int4:  # the unpatched block with the same dequantised weights loaded, computed before patching
                key = (group_size, symmetric)
                if key not in deq_cache:
                    deq_cache[key] = Int4ExpertWeights.from_bf16(expert_weights(experts), group_size,
                                                                 symmetric).dequantize()
                with _loaded_weights(experts, deq_cache[key]), torch.no_grad():
                    ref_deq = block(x)
            report = patch_moe_experts(block, name, group_size=group_size, symmetric=symmetric, keep_bf16_copy=True)
            try:
                emit(**row, expert_gb=report.expert_bytes_after / GB,
                     **_check_and_time(block, x, ref, ref_deq, int4, device,
                                       graph_ok and T <= GRAPH_MAX_TOKENS and b.graph_safe, cpu_reps))
            finally:
                unpatch_moe_experts(block)
        for r in rows:
            if r["T"] == T and r["status"] == "ok":
                r["speedup_vs_eager"] = timed.get("eager", math.nan) / r["median_ms"]
                r["speedup_vs_hf_grouped_mm"] = timed.get("grouped_mm", math.nan) / r["median_ms"]
    return rows


def _check_and_time(block: nn.Module, x: torch.Tensor, ref: torch.Tensor, ref_deq: torch.Tensor | None, int4: bool,
                    device: torch.device, use_graph: bool, cpu_reps: int) -> dict:
    """One row's correctness check and, if it passes, its timing (fields of a compare_block row)."""
    try:
        with torch.no_grad():
            y = block(x)
        err = relative_error(y, ref)
        out = dict(rel_err=err)
        if int4:
            err_deq = relative_error(y, ref_deq)
            out["rel_err_dequant"] = err_deq
            if not (err_deq < BF16_TOL and err < INT4_LOOSE_TOL):
                return dict(out, status="FAIL", reason=f"rel err {err_deq:.2e} vs the dequantised weights (tol "
                            f"{BF16_TOL}), {err:.2e} vs bf16 (bound {INT4_LOOSE_TOL})")
        elif not err < BF16_TOL:
            return dict(out, status="FAIL", reason=f"rel err {err:.2e} >= {BF16_TOL}")
        timing, note = _time(_forward_fn(block, x), device, use_graph, cpu_reps)
    except torch.cuda.OutOfMemoryError as exc:  # e.g. transformers' batched_mm gathers [T*k, 2F, H] weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return dict(status="skipped", reason=f"CUDA out of memory: {str(exc).splitlines()[0][:160]}")
    except Exception as exc:  # a crash is a failed row (reported), not the end of the comparison
        return dict(status="FAIL", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return dict(out, status="ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                timing=timing.method, reason=note)


def format_rows(rows: Sequence[dict]) -> str:
    """A plain-text table of compare_block's rows."""
    cols = [("arch", "arch", "{}"), ("T", "T", "{}"), ("implementation", "implementation", "{}"),
            ("ms", "median_ms", "{:.3f}"), ("vs eager", "speedup_vs_eager", "{:.2f}x"),
            ("vs hf grouped_mm", "speedup_vs_hf_grouped_mm", "{:.2f}x"), ("rel err", "rel_err", "{:.1e}"),
            ("rel err deq", "rel_err_dequant", "{:.1e}"), ("expert GB", "expert_gb", "{:.3f}"),
            ("timing", "timing", "{}"), ("status", "status", "{}")]

    def cell(v, fmt):
        return "-" if isinstance(v, float) and math.isnan(v) else fmt.format(v)

    table = [[h for h, _, _ in cols]]
    for r in rows:
        cells = [cell(r[k], f) for _, k, f in cols]
        if r["reason"]:
            cells[-1] += f" ({r['reason']})"
        table.append(cells)
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i in (0, 2, 9, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths)))
             .rstrip() for t in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_block_times(rows: Sequence[dict], title: str | None = None):
    """Median ms per implementation (bars, log scale), one panel per T; moe_tut rows coloured. A static figure."""
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    tokens = sorted({r["T"] for r in ok})
    if not tokens:
        raise ValueError("no timed rows to plot (every row failed or was skipped)")
    fig, axes = plt.subplots(1, len(tokens), figsize=(5.2 * len(tokens), 0.45 * max(
        sum(r["T"] == t for r in ok) for t in tokens) + 1.6), squeeze=False)
    colours = {"transformers": "#9e9e9e", "bf16": "#1f77b4", "int4": "#ff7f0e"}
    for ax, T in zip(axes[0], tokens):
        sel = [r for r in ok if r["T"] == T]
        names = [r["implementation"] for r in sel]
        ms = [r["median_ms"] for r in sel]
        ax.barh(names, ms, color=[colours["transformers"] if r["library"] == "transformers" else colours[r["weights"]]
                                  for r in sel])
        for i, r in enumerate(sel):
            ms_text = f"{r['median_ms']:.0f}" if r["median_ms"] >= 100 else f"{r['median_ms']:.3g}"
            ax.text(r["median_ms"], i, f" {ms_text} ms ({r['speedup_vs_eager']:.2f}x)", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms per block forward (median, log scale)")
        ax.set_title(f"T = {T}")
        ax.set_xlim(min(ms) / 1.5, max(ms) * 8)
    fig.suptitle(f"{title or ok[0]['arch'] + ' MoE block: transformers vs moe_tut'}\ngrey: transformers, blue: "
                 "moe_tut bf16, orange: moe_tut INT4; (x) = speedup vs transformers eager", fontsize=10)
    fig.tight_layout()
    return fig

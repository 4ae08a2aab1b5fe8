"""moe_tut.hf: moe_tut backends inside transformers' Mixtral, Qwen3-MoE, DeepSeek-V3 and GLM-4.5 models.

Tiny random-weight models are built from transformers' own config classes (no downloads) with weights
at std 1/sqrt(fan_in) (hf.realistic_init_), so the experts carry a real share of every output: a wrong
expert computation shows in the logits (test_gate_up_order shows how much). Shapes stay tiny (H = F = 64,
8 experts, top-2, 16 tokens) so the whole file runs in seconds on a CPU under Triton's interpreter.

Why the logits checks use models with ONE MoE layer: routing is discrete. A bf16 kernel that rounds
differently from transformers (all of them do, within bf16 tolerance) can flip a near-tie top-k choice
in a later layer, and a flipped token's output then differs by O(1), not by bf16 rounding (seen here:
2 of 16 tokens flipped in a 2-layer Mixtral with `triton`, 8e-2 logits error). Every layer of a
multi-layer model is checked instead on its own recorded inputs (test_every_layer_matches).
"""

import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("CI"):
    import transformers  # noqa: F401  (CI installs the test extra: missing transformers is a failure there)
else:
    pytest.importorskip("transformers", reason="moe_tut.hf needs transformers (pip install -e '.[hf]')")

import moe_tut.hf as mhf  # noqa: E402
from moe_tut.backends import BackendUnavailable, get_backend  # noqa: E402
from moe_tut.bench.timing import capture_graph  # noqa: E402
from moe_tut.presets import custom  # noqa: E402
from moe_tut.quant import Int4ExpertWeights  # noqa: E402
from moe_tut.reference import relative_error  # noqa: E402
from moe_tut.routing import RoutingPlan, simulate_routing  # noqa: E402
from moe_tut.weights import ExpertWeights  # noqa: E402

TOL = 2e-2  # bf16 backends vs the unpatched bf16 model (relative Frobenius error)
INT4_LOOSE = mhf.INT4_LOOSE_TOL  # INT4 vs bf16: quantisation error, only bounded
G = 32  # INT4 group size for H = F = 64 (128 would not divide them)
ARCHS = list(mhf.ARCHS)
BF16_BACKENDS = ["naive", "bmm", "grouped_mm", "triton"]
SHARED_EXPERT_ARCHS = ["deepseek_v3", "glm4_moe"]  # first layer dense, then MoE blocks with a shared expert
# As in the other kernel tests: the GPU where there is one (tiny shapes), else the CPU with Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INPUT_IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def model_with_moe_layers(arch, n, **kw):
    """A tiny model with exactly n MoE layers (DeepSeek-V3 and GLM-4.5 put a dense layer first)."""
    return mhf.tiny_model(arch, num_layers=n + (arch in SHARED_EXPERT_ARCHS), **{"device": DEVICE, **kw})


def run(model):
    with torch.no_grad():
        out = model(INPUT_IDS, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def experts_of(model):
    return [m for _, m in mhf.find_moe_experts(model)]


def param_identity(model):
    return {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_backend_matches_unpatched(arch, backend):
    model = model_with_moe_layers(arch, 1)
    logits0, hidden0 = run(model)
    before = param_identity(model)
    report = mhf.patch_moe_experts(model, backend)
    assert (report.backend, report.weight_format, report.num_modules) == (backend, "bf16", 1)
    assert report.model_type == arch and report.experts_per_module == 8
    assert report.expert_bytes_after == report.expert_bytes_before == 8 * 3 * 64 * 64 * 2
    assert report.model_bytes_after == report.model_bytes_before
    logits1, hidden1 = run(model)
    assert relative_error(hidden1, hidden0) < TOL
    assert relative_error(logits1, logits0) < TOL
    # Zero copies: the same Parameter objects and storage, and the backend reads exactly them.
    assert param_identity(model) == before
    (experts,) = experts_of(model)
    w = mhf.expert_weights(experts)
    assert w.w13.data_ptr() == experts.gate_up_proj.data_ptr() and w.w2.data_ptr() == experts.down_proj.data_ptr()
    # Undo: transformers' forward again, bit for bit.
    assert mhf.unpatch_moe_experts(model) == 1
    assert "forward" not in experts.__dict__ and not mhf.is_patched(model)
    assert torch.equal(run(model)[0], logits0)


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_matches(arch, backend):
    # Two MoE layers: each patched experts module is fed the inputs it saw in the unpatched run.
    model = model_with_moe_layers(arch, 2)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args, out))) for m in experts_of(model)]
    run(model)
    for h in hooks:
        h.remove()
    assert mhf.patch_moe_experts(model, backend).num_modules == 2 == len(seen)
    for module, (x, ids, tw), y in seen:
        assert tw.is_floating_point() and x.dtype == torch.bfloat16
        with torch.no_grad():
            out = module(x, ids, tw)
        assert out.shape == y.shape and out.dtype == y.dtype
        assert relative_error(out, y) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_vs_dequantised_and_bf16(arch):
    model = model_with_moe_layers(arch, 1)
    logits_bf16, _ = run(model)
    report = mhf.patch_moe_experts(model, "triton_int4", group_size=G)
    n_values = 8 * 3 * 64 * 64
    assert report.weight_format == "int4" and report.group_size == G and report.symmetric
    assert report.expert_bytes_before == 2 * n_values  # bf16 baseline
    assert report.expert_bytes_after == n_values // 2 + 2 * n_values // G  # codes + one bf16 scale per group
    assert report.compression_vs_bf16 == pytest.approx(2 / (0.5 + 2 / G))
    # The bf16 tensors really left the model: the model shrank by exactly the saving.
    assert report.model_bytes_before - report.model_bytes_after == report.saved_bytes > 0
    (experts,) = experts_of(model)
    assert experts.gate_up_proj.numel() == 0 and experts.down_proj.numel() == 0
    assert "bf16" in str(report) and "smaller than bf16" in str(report)
    logits_int4, _ = run(model)
    err_bf16 = relative_error(logits_int4, logits_bf16)
    print(f"{arch}: INT4 (group {G}) vs bf16 logits: rel err {err_bf16:.3f}")
    assert 1e-3 < err_bf16 < INT4_LOOSE  # quantisation shows, and stays bounded
    deq = mhf.expert_weights(experts).dequantize()
    # Default undo: bf16 parameters dequantised from the INT4 weights, i.e. exactly what INT4 computed with.
    assert "DEQUANTISED" in report.undo
    mhf.unpatch_moe_experts(model)
    assert torch.equal(experts.gate_up_proj, deq.w13) and torch.equal(experts.down_proj, deq.w2)
    logits_deq, _ = run(model)  # the unpatched model with the same dequantised weights loaded
    assert relative_error(logits_int4, logits_deq) < TOL


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int4_keep_bf16_copy_restores_exactly(symmetric):
    model = model_with_moe_layers("mixtral", 1)
    logits_bf16, _ = run(model)
    (experts,) = experts_of(model)
    originals = (experts.gate_up_proj, experts.down_proj)
    values = [p.detach().clone() for p in originals]
    report = mhf.patch_moe_experts(model, "triton_int4", group_size=G, symmetric=symmetric, keep_bf16_copy=True)
    assert report.host_copy_bytes == report.expert_bytes_before and "exactly" in report.undo
    assert ("moe_tut_w13_zeros" in dict(experts.named_buffers())) == (not symmetric)
    assert not any("moe_tut" in k for k in model.state_dict())  # INT4 buffers are not saved with the model
    logits_int4, _ = run(model)
    assert 1e-3 < relative_error(logits_int4, logits_bf16) < INT4_LOOSE
    mhf.unpatch_moe_experts(model)
    assert experts.gate_up_proj is originals[0] and experts.down_proj is originals[1]
    assert torch.equal(originals[0], values[0]) and torch.equal(originals[1], values[1])
    assert not any("moe_tut" in k for k, _ in experts.named_buffers())
    assert torch.equal(run(model)[0], logits_bf16)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int4_weights_are_moe_tut_quantised(symmetric):
    # The patch quantises with moe_tut.quant, nothing else: the same codes, scales and zeros as from_bf16.
    model = model_with_moe_layers("qwen3_moe", 1)
    (experts,) = experts_of(model)
    expect = Int4ExpertWeights.from_bf16(mhf.expert_weights(experts), G, symmetric)
    mhf.patch_moe_experts(model, "triton_int4", group_size=G, symmetric=symmetric)
    got = mhf.expert_weights(experts)
    for name in ("w13", "w2"):
        a, b = getattr(got, name), getattr(expect, name)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
        assert (a.zeros is None) == symmetric and (symmetric or torch.equal(a.zeros, b.zeros))


@pytest.mark.parametrize("keep", [False, True], ids=["dequantised-rollback", "exact-rollback"])
def test_failed_int4_patch_rolls_back(monkeypatch, keep):
    # The second layer's quantisation fails (as an out-of-memory would): the first is rolled back, and the
    # error says how exactly (without keep_bf16_copy its bf16 weights come back dequantised).
    model = model_with_moe_layers("mixtral", 2)
    first, second = experts_of(model)
    original = first.gate_up_proj.detach().clone()
    real = Int4ExpertWeights.from_bf16.__func__
    calls = []

    def flaky(cls, weights, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while quantising")
        return real(cls, weights, *args, **kw)

    monkeypatch.setattr(Int4ExpertWeights, "from_bf16", classmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated failure") as info:
        mhf.patch_moe_experts(model, "triton_int4", group_size=G, keep_bf16_copy=keep)
    assert not mhf.is_patched(model) and "forward" not in first.__dict__
    assert second.gate_up_proj.numel() > 0 and first.gate_up_proj.shape == original.shape
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert torch.equal(first.gate_up_proj, original) == keep
    assert ("dequantised" in notes) == (not keep)


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_up_order(arch):
    # transformers' eager experts = moe_tut's layout (w13 = gate rows, then up rows): same result. With the
    # halves swapped the error is far over tolerance, so the parity tests above would catch a wrong order.
    (experts,) = experts_of(model_with_moe_layers(arch, 1))
    experts.config._experts_implementation = "eager"
    T, E, k = 24, 8, 2
    ids, tw = simulate_routing(T, E, k, "zipf", seed=3, device=DEVICE)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        y_hf = experts(x, ids, tw)
    plan = RoutingPlan.build(ids, tw, E)
    w = mhf.expert_weights(experts)
    naive = get_backend("naive")
    assert relative_error(naive(x, w, plan), y_hf) < TOL
    F = w.ffn_size
    swapped = ExpertWeights(torch.cat([w.w13[:, F:], w.w13[:, :F]], dim=1), w.w2)
    assert relative_error(naive(x, swapped, plan), y_hf) > 0.3


@pytest.mark.parametrize("arch", SHARED_EXPERT_ARCHS)
def test_router_and_shared_expert_untouched(arch):
    model = model_with_moe_layers(arch, 1)
    report = mhf.patch_moe_experts(model, "triton")
    assert report.modules == ("model.layers.1.mlp.experts",)  # layer 0 is dense: nothing patched there
    block = model.model.layers[1].mlp
    for m in (block, block.gate, block.shared_experts, model.model.layers[0].mlp):
        assert "forward" not in m.__dict__
    # The shared expert is a large part of the block's output, so dropping it would fail the parity test.
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        y = block(x)
        block.shared_experts.down_proj.weight.zero_()
        y_without_shared = block(x)
    assert relative_error(y_without_shared, y) > 0.2


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_models_name_what_is_supported():
    import transformers

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type 'llama'\) has no MoE experts.*Mixtral "
                                         r"\(MixtralExperts"):
        mhf.patch_moe_experts(llama.bfloat16())
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    gpt_oss = GptOssExperts(transformers.GptOssConfig(hidden_size=32, intermediate_size=64, num_local_experts=4))
    with pytest.raises(ValueError, match="does not support.*GptOssExperts.*Supported: Mixtral"):
        mhf.patch_moe_experts(gpt_oss)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mhf.patch_moe_experts("mixtral")


def test_unknown_or_unavailable_backend():
    model = model_with_moe_layers("mixtral", 1, device="cpu")  # cuda_int4 never runs on CPU tensors
    with pytest.raises(ValueError, match="choose one of triton, triton_int4, cuda_int4, naive, bmm, grouped_mm"):
        mhf.patch_moe_experts(model, "reference")
    with pytest.raises(BackendUnavailable, match="backend 'cuda_int4' is unavailable: .*CUDA GPUs only"):
        mhf.patch_moe_experts(model, "cuda_int4")
    assert not mhf.is_patched(model)


def test_wrong_dtype_or_activation_or_group_size():
    with pytest.raises(TypeError, match=r"is torch.float32; moe_tut.hf patches bfloat16 experts"):
        mhf.patch_moe_experts(model_with_moe_layers("qwen3_moe", 1, dtype=torch.float32))
    import transformers

    config = mhf.moe_config("mixtral", 4, 64, 64, 2)
    config.hidden_act = "gelu"
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config).bfloat16()
    with pytest.raises(ValueError, match="activation 'gelu'.*SiLU"):
        mhf.patch_moe_experts(block)
    model = model_with_moe_layers("mixtral", 1)
    with pytest.raises(ValueError, match="group_size=48 does not divide gate_up_proj's reduction dim H=64"):
        mhf.patch_moe_experts(model, "triton_int4", group_size=48)
    assert not mhf.is_patched(model) and experts_of(model)[0].gate_up_proj.numel() > 0  # nothing changed


def test_patch_state_errors():
    model = model_with_moe_layers("mixtral", 1)
    with pytest.raises(ValueError, match="nothing to undo"):
        mhf.unpatch_moe_experts(model)
    mhf.patch_moe_experts(model, "naive")
    with pytest.raises(ValueError, match="already patched with backend 'naive'"):
        mhf.patch_moe_experts(model, "triton")
    with pytest.raises(RuntimeError, match="forward only.*torch.no_grad"):
        model(INPUT_IDS)  # autograd on: the kernels have no backward
    (experts,) = experts_of(model)
    with pytest.raises(TypeError, match="hidden states reaching the experts are torch.float32"), torch.no_grad():
        experts(torch.randn(3, 64, device=DEVICE), torch.zeros(3, 2, dtype=torch.long, device=DEVICE),
                torch.ones(3, 2, device=DEVICE))


def test_import_does_not_import_transformers():
    code = ("import sys, moe_tut; from moe_tut import patch_moe_experts, unpatch_moe_experts; "
            "assert 'transformers' not in sys.modules, 'import moe_tut imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- notebook helpers


def test_compare_block_rows():
    block = mhf.build_moe_block("qwen3_moe", custom(4, 64, 64, 2), device=DEVICE)
    rows = mhf.compare_block(block, [1, 6], backends=["naive", "triton_int4"], hf_implementations=["eager"],
                             group_size=G, cpu_reps=1)
    assert [(r["T"], r["implementation"]) for r in rows] == [
        (T, name) for T in (1, 6) for name in ("transformers eager", "moe_tut naive", "moe_tut triton_int4")]
    assert all(r["status"] == "ok" for r in rows), mhf.format_rows(rows)
    assert {r["timing"] for r in rows} <= ({"cpu-clock"} if DEVICE == "cpu" else {"cuda-events", "cuda-graph"})
    for r in rows:
        if r["weights"] == "int4":
            assert r["rel_err_dequant"] < TOL and 1e-3 < r["rel_err"] < INT4_LOOSE
            assert r["expert_gb"] == pytest.approx(4 * 3 * 64 * 64 * (0.5 + 2 / G) / 1e9)
        else:
            assert r["rel_err"] < TOL
    assert [r["speedup_vs_eager"] for r in rows if r["library"] == "transformers"] == [1.0, 1.0]
    assert not mhf.is_patched(block) and block.experts.config._experts_implementation == "eager"
    assert "moe_tut triton_int4" in mhf.format_rows(rows)
    fig = mhf.plot_block_times(rows)
    assert len(fig.axes) == 2
    # A spent budget skips rows instead of running them.
    skipped = mhf.compare_block(block, [1], backends=["naive"], hf_implementations=["eager"], deadline=0.0)
    assert [r["status"] for r in skipped] == ["skipped", "skipped"]


def test_preset_blocks():
    from moe_tut.presets import get_preset

    assert mhf.arch_for_preset(get_preset("qwen3-30b-a3b")) == "qwen3_moe"
    assert mhf.arch_for_preset(get_preset("debug")) == "mixtral"
    block = mhf.build_moe_block("deepseek_v3", custom(8, 64, 64, 2), device=DEVICE)
    assert type(block).__name__ == "DeepseekV3MoE" and block.experts.gate_up_proj.dtype == torch.bfloat16
    assert block.experts.gate_up_proj.shape == (8, 128, 64)
    assert block.experts.gate_up_proj.float().std().item() == pytest.approx(64 ** -0.5, rel=0.1)


# ---------------------------------------------------------------------------------------------- GPU

GPU_BACKENDS = BF16_BACKENDS + ["triton_int4", "cuda_int4"]


def skip_if_unavailable(backend, device="cuda"):
    reason = get_backend(backend).unavailable(custom(8, 512, 1024, 2), torch.device(device))
    if reason:
        pytest.skip(f"{backend} is unavailable here: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_gpu_backends_match_unpatched(arch, backend):
    # H = 512, F = 1024, 8 experts, 2 x 64 tokens: the INT4 kernels run with group 128 as in the benchmark.
    skip_if_unavailable(backend)
    model = model_with_moe_layers(arch, 1, hidden_size=512, ffn_size=1024, device="cuda")
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        ref = model(ids).logits
        mhf.patch_moe_experts(model, backend)
        out = model(ids).logits
    err = relative_error(out, ref)
    if backend in ("triton_int4", "cuda_int4"):
        assert err < INT4_LOOSE
        mhf.unpatch_moe_experts(model)  # dequantised weights back
        with torch.no_grad():
            assert relative_error(out, model(ids).logits) < TOL
    else:
        assert err < TOL
        mhf.unpatch_moe_experts(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [False, True], ids=["dequantised-undo", "keep-bf16-copy"])
def test_gpu_int4_frees_device_memory(keep):
    model = model_with_moe_layers("qwen3_moe", 1, num_experts=16, hidden_size=1024, ffn_size=1024, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    report = mhf.patch_moe_experts(model, "triton_int4", keep_bf16_copy=keep)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert report.saved_bytes == 16 * 3 * 1024 * 1024 * 2 - report.expert_bytes_after
    assert freed >= 0.95 * report.saved_bytes  # the saving is real device memory, not only bookkeeping
    mhf.unpatch_moe_experts(model)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() >= before - 1024 ** 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_int4"])
def test_gpu_patched_block_is_graph_safe(backend):
    # A decode step (T = 1) of a patched block captured in a CUDA graph: routing, plan and kernels all replay,
    # so a new token in the static input buffer gets its own experts and the right output.
    block = mhf.build_moe_block("mixtral", custom(8, 512, 1024, 2), device="cuda")
    mhf.patch_moe_experts(block, backend)
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expect, expect2 = block(x), block(x2)
        graph, out = capture_graph(lambda: block(x))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, expect) < 1e-3
        x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, expect2) < 1e-3

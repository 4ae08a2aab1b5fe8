import os

import pytest
import torch
import triton
import triton.language as tl

from moe_tut import env


def test_device_info_on_this_machine():
    info = env.device_info()
    d = info.as_dict()
    assert d["torch_version"] == torch.__version__ and d["triton_version"] == triton.__version__
    if torch.cuda.is_available():
        assert info.kind == "cuda" and info.sm_count > 0 and info.shared_memory_per_block_kb > 0
    else:
        assert info.kind == "cpu" and info.triton_interpreter
        assert "not GPU performance" in info.summary()


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))


def test_bf16_dot_is_correct_here():
    # Under the interpreter this only holds with env.patch_interpreter_bf16_dot (triton issue 11584).
    device = env.default_device()
    a = torch.randn(16, 16, device=device).bfloat16()
    b = torch.randn(16, 16, device=device).bfloat16()
    c = torch.empty(16, 16, device=device)
    _dot_kernel[(1,)](a, b, c, N=16)
    ref = a.float() @ b.float()
    assert ((c - ref).norm() / ref.norm()).item() < 1e-2


def test_programmatic_launch_setting(monkeypatch):
    monkeypatch.delenv(env.PDL_ENV, raising=False)
    assert env.programmatic_launch_enabled()
    monkeypatch.setenv(env.PDL_ENV, "0")
    assert not env.programmatic_launch_enabled()
    assert not env.programmatic_launch_ok(torch.device("cuda", 0))  # off: no device query at all
    monkeypatch.setenv(env.PDL_ENV, "1")
    assert not env.programmatic_launch_ok(torch.device("cpu"))
    monkeypatch.setenv(env.PDL_ENV, "off")
    with pytest.raises(ValueError, match=env.PDL_ENV):
        env.programmatic_launch_enabled()


def test_environment_sets_clears_and_restores(monkeypatch):
    monkeypatch.setenv("MOE_TUT_TEST_A", "old")
    monkeypatch.setenv("MOE_TUT_TEST_B", "cleared")
    monkeypatch.delenv("MOE_TUT_TEST_C", raising=False)
    with pytest.raises(RuntimeError, match="inside"):
        with env.environment({"MOE_TUT_TEST_A": "new", "MOE_TUT_TEST_C": "set"}, clear=["MOE_TUT_TEST_B"]):
            assert os.environ["MOE_TUT_TEST_A"] == "new" and os.environ["MOE_TUT_TEST_C"] == "set"
            assert "MOE_TUT_TEST_B" not in os.environ
            raise RuntimeError("inside")  # restored on the way out of an exception too
    assert os.environ["MOE_TUT_TEST_A"] == "old" and os.environ["MOE_TUT_TEST_B"] == "cleared"
    assert "MOE_TUT_TEST_C" not in os.environ


def test_env_choice_defaults_to_the_first_and_names_the_variable(monkeypatch):
    monkeypatch.delenv("MOE_TUT_TEST_CHOICE", raising=False)
    assert env.env_choice("MOE_TUT_TEST_CHOICE", ("a", "b")) == "a"
    monkeypatch.setenv("MOE_TUT_TEST_CHOICE", "  ")
    assert env.env_choice("MOE_TUT_TEST_CHOICE", ("a", "b")) == "a"
    monkeypatch.setenv("MOE_TUT_TEST_CHOICE", " b ")
    assert env.env_choice("MOE_TUT_TEST_CHOICE", ("a", "b")) == "b"
    monkeypatch.setenv("MOE_TUT_TEST_CHOICE", "B")
    with pytest.raises(ValueError, match="MOE_TUT_TEST_CHOICE='B': expected one of"):
        env.env_choice("MOE_TUT_TEST_CHOICE", ("a", "b"))


def test_env_parsed_is_none_when_unset_or_blank_and_names_the_variable(monkeypatch):
    monkeypatch.delenv("MOE_TUT_TEST_PARSED", raising=False)
    assert env.env_parsed("MOE_TUT_TEST_PARSED", int) is None
    monkeypatch.setenv("MOE_TUT_TEST_PARSED", "  ")
    assert env.env_parsed("MOE_TUT_TEST_PARSED", int) is None
    monkeypatch.setenv("MOE_TUT_TEST_PARSED", " 12 ")
    assert env.env_parsed("MOE_TUT_TEST_PARSED", int) == 12
    monkeypatch.setenv("MOE_TUT_TEST_PARSED", "twelve")
    with pytest.raises(ValueError, match="MOE_TUT_TEST_PARSED='twelve': invalid literal"):
        env.env_parsed("MOE_TUT_TEST_PARSED", int)

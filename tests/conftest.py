"""Test setup: Triton's interpreter on machines without CUDA (moe_tut turns it on at import, before any
kernel is defined), and `@pytest.mark.gpu` tests skipped with a reason where there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import moe_tut  # noqa: E402,F401  (applies the interpreter's bf16 dot fix)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run on a GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Triton kernels. Import the modules themselves (e.g. `moe_tut.kernels.grouped_gemm`): each defines
kernels at import, so Triton's interpreter must already be on where there is no GPU (`import moe_tut`
does that)."""

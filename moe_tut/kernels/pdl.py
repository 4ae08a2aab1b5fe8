"""Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode forward.

At decode sizes a forward is a chain of short kernels (plan -> GEMM1 -> GEMM2 -> sum over slots), and
each boundary costs a launch gap plus the ramp of the next kernel. A kernel launched with launch_pdl=True
may have its programs scheduled while the previous kernel on the stream is still draining. That is only
safe because every such kernel starts with wait_for_previous_kernel: no program reads or writes memory
before the previous kernel has finished and its writes are visible, so the results are the same bits
with PDL on or off. Every program waits, even one with nothing to do, so a kernel never completes before
its predecessor (the next kernel's wait covers the whole chain).

The host decides per forward with env.programmatic_launch_ok (MOE_TUT_PDL, sm_90+, never under the
interpreter) and launches with **pdl_launch(that). With USE_PDL off nothing is emitted or traced: the
interpreter cannot run the inline PTX.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """The first statement of a kernel that may be launched with PDL."""
    if USE_PDL:
        gdc_wait()  # the previous kernel has finished; its writes are visible
        # Only after the wait: the next kernel may then start early, and it waits for this one in turn.
        gdc_launch_dependents()


def pdl_launch(pdl: bool) -> dict:
    """Launch keywords for a kernel that starts with wait_for_previous_kernel(USE_PDL)."""
    return dict(USE_PDL=pdl, launch_pdl=pdl)

"""Programmatic dependent launch inside the kernels: the two ``@triton.jit`` helpers every fast-path kernel calls.

See :mod:`morphserve.kernels.triton_support` for the design.  ``USE_PDL`` is a ``tl.constexpr``: when False (the
interpreter, pre-Hopper GPUs, PDL disabled) both helpers compile to nothing.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has completed and its writes are visible.  Call before the
    first global memory access."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(USE_PDL: tl.constexpr):
    """Allow the next kernel to be scheduled (it still waits for this one to complete before touching memory)."""
    if USE_PDL:
        gdc_launch_dependents()

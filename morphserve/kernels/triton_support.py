"""What every Triton kernel module of the fast path shares: running without a GPU, and dtype mapping.

**Interpreter mode.**  On a machine without CUDA (CI, laptops) the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), which executes each program instance with NumPy.  Triton reads that variable when a
``@triton.jit`` function is *decorated*, so :func:`enable_interpreter` must run before any kernel module is
imported.  Triton 3.6's interpreter converts scalar tensors to Python ints with ``int(array)`` on 1-element 1-D
arrays, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"): every loop
whose bound is a runtime scalar fails.  This is triton-lang/triton#9171, fixed upstream after 3.6.0; until the pin
moves, :func:`enable_interpreter` installs the same one-line fix (convert through the single element).

**Programmatic dependent launch (PDL).**  On Hopper, a kernel launched with PDL may start while the previous
kernel in the stream is finishing; it waits (``griddepcontrol.wait``) before touching memory, so results are the
same, but the launch latency between dependent kernels (a few microseconds, paid ~300 times per decode step)
overlaps the previous kernel's tail.  Every kernel of the fast path calls
:func:`morphserve.kernels.pdl.pdl_wait` first (a no-op unless launched with PDL) and
:func:`~morphserve.kernels.pdl.pdl_trigger` once its main loop is done; :func:`launch_options` adds
``launch_pdl=True`` on devices of compute capability >= 9 when :func:`pdl_enabled` (default on;
``MORPHSERVE_PDL=0`` or :func:`set_pdl` turns it off).  Because every kernel waits before it reads or writes, a
kernel launched after a PDL kernel still sees all earlier kernels' results.

**Dtypes.**  Kernels take the element type of raw KV pointers as a ``tl.constexpr`` (:func:`tl_dtype`).  Matrix
products on float32 inputs must ask for IEEE precision (:func:`dot_precision`), or Triton uses TF32 on GPUs and
the float32 parity runs drift.
"""

from __future__ import annotations

import os

import torch

_INTERPRETER_PATCHED = False
_PDL: bool | None = None  # None: decided from MORPHSERVE_PDL on first use


def enable_interpreter() -> None:
    """Run Triton kernels under the interpreter (CPU).  Call before importing any kernel module."""
    global _INTERPRETER_PATCHED
    os.environ["TRITON_INTERPRET"] = "1"
    if _INTERPRETER_PATCHED:
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # triton-lang/triton#9171
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch_lang_tensor
    _INTERPRETER_PATCHED = True


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``: compiled on CUDA, interpreted on CPU."""
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


def set_pdl(enabled: bool | None) -> None:
    """Turn programmatic dependent launch on or off for later launches (None: back to ``MORPHSERVE_PDL``).  CUDA
    graphs keep the launches they captured."""
    global _PDL
    _PDL = enabled


def pdl_enabled() -> bool:
    global _PDL
    if _PDL is None:
        _PDL = os.environ.get("MORPHSERVE_PDL", "1") not in ("0", "")
    return _PDL


def use_pdl(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL (compiled CUDA, compute capability >= 9, and enabled)."""
    return (device.type == "cuda" and not interpreting() and pdl_enabled()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_options(device: torch.device) -> dict[str, object]:
    """Keyword arguments for a kernel launch: ``USE_PDL`` (the kernels' constexpr) and ``launch_pdl``."""
    if use_pdl(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch floating dtype the engine computes in."""
    import triton.language as tl

    table = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
    try:
        return table[dtype]
    except KeyError:
        raise ValueError(f"Triton kernels support float16, bfloat16 and float32, not {dtype}") from None


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on operands of ``dtype``: exact IEEE products for float32."""
    return "ieee" if dtype == torch.float32 else "tf32"

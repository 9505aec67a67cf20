"""Freezing the warm heap: once an engine is warm, the process's long-lived objects leave the cyclic collector.

Why: a full (generation-2) collection walks every tracked object of the process (torch, transformers, Triton, the
engine), and one that fires inside a step stalls it (measured: a 314 ms generation-2 collection inside one decode
step on an H200, 2026-12-02, ``benchmarks/bench_fastpath.py``).  :func:`freeze` collects the garbage first, then
``gc.freeze()`` moves every surviving tracked object into the permanent generation, which collections skip (vLLM
does the same after start-up).  Objects created later are collected as usual.

Freezing is process-wide and cannot be undone for one engine's objects alone, so it is **reference counted**: each
holder (an engine: :meth:`LLMEngine.warmed_up <morphserve.engine.engine.LLMEngine.warmed_up>` takes one reference,
:meth:`LLMEngine.close <morphserve.engine.engine.LLMEngine.close>` gives it back) calls :func:`freeze` once and
:func:`release` once.  Every :func:`freeze` collects and freezes again (so a second engine's warm objects are frozen
too); the last :func:`release` calls ``gc.unfreeze()``, which moves the frozen objects back into the oldest
generation, where the next full collection frees the unreachable ones.  Until then, cyclic garbage frozen with an
engine that was closed stays allocated (reference counting still frees acyclic garbage).  If other code had frozen
the heap before the first holder froze it, the last release leaves it frozen (``gc.unfreeze()`` would undo that
code's freeze too).
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_holders = 0
_frozen_before = False  # the heap was already frozen by other code when the first holder froze it


def freeze() -> None:
    """Collect the garbage, then freeze every surviving object; takes one reference (see the module docstring)."""
    global _holders, _frozen_before
    with _lock:
        if _holders == 0:
            _frozen_before = gc.get_freeze_count() > 0
        gc.collect()
        gc.freeze()
        _holders += 1


def release() -> None:
    """Give back one reference taken by :func:`freeze`; the last one unfreezes the heap (unless other code had frozen
    it first)."""
    global _holders
    with _lock:
        if _holders == 0:
            raise RuntimeError("heap_freeze.release() without a matching freeze(): no reference is held")
        _holders -= 1
        if _holders == 0 and not _frozen_before:
            gc.unfreeze()


def holders() -> int:
    """References held now (0: this module keeps nothing frozen)."""
    return _holders

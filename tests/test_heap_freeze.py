"""The warm-heap freeze: taken by an engine once warm (LLMEngine.warmed_up), reference counted across engines,
released by LLMEngine.close, so engines built one after another in a process do not keep each other's garbage."""

import gc
import weakref

import pytest

from morphserve.engine import heap_freeze
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def _engine(model, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), num_kv_blocks=16, **kw))


@pytest.fixture(autouse=True)
def unfrozen_heap():
    """Each test starts from an unfrozen heap: other code in the process may have frozen it before (seen on the GPU
    machine, 2026-12-02: a fresh ``python3`` there starts with 375 frozen objects), which the counts below would
    misread.  That freeze is put back afterwards."""
    was_frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    yield
    if was_frozen:
        gc.freeze()


def test_engines_hold_the_freeze_until_the_last_one_closes(tiny_mha):
    a, b = _engine(tiny_mha), _engine(tiny_mha)
    gc.unfreeze()  # in case building an engine imported code that froze the heap (see unfrozen_heap)
    assert gc.get_freeze_count() == 0 and heap_freeze.holders() == 0
    cycle = _Node()
    ref = weakref.ref(cycle)
    assert a.warmed_up() is True
    frozen = gc.get_freeze_count()
    assert frozen > 0 and heap_freeze.holders() == 1
    assert a.warmed_up() is True and heap_freeze.holders() == 1  # a second call holds nothing more
    del cycle
    gc.collect()
    assert ref() is not None  # frozen: out of the collector's reach
    # Counts below are only compared with 0: a frozen object whose last reference goes away is freed (and
    # leaves the count) as usual, so the count is not monotonic.
    assert b.warmed_up() is True and heap_freeze.holders() == 2 and gc.get_freeze_count() > 0
    a.close()
    a.close()  # idempotent
    assert heap_freeze.holders() == 1 and gc.get_freeze_count() > 0  # b still holds it
    b.close()
    assert heap_freeze.holders() == 0 and gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None  # unfrozen: the cycle is garbage again
    assert a.warmed_up() is True and gc.get_freeze_count() > 0  # a closed engine may freeze again
    a.close()
    assert gc.get_freeze_count() == 0


def test_opt_out_and_bad_values(tiny_mha):
    eng = _engine(tiny_mha, freeze_heap=False)
    assert eng.warmed_up() is False and heap_freeze.holders() == 0 and gc.get_freeze_count() == 0
    eng.close()
    with pytest.raises(ValueError, match="freeze_heap must be True or False, got 'yes'"):
        EngineConfig(freeze_heap="yes")
    with pytest.raises(RuntimeError, match="without a matching freeze"):
        heap_freeze.release()


def test_a_freeze_by_other_code_is_left_in_place(tiny_mha):
    gc.freeze()  # other code froze the heap before any engine did
    try:
        eng = _engine(tiny_mha)
        assert eng.warmed_up() is True and gc.get_freeze_count() > 0
        eng.close()
        assert heap_freeze.holders() == 0 and gc.get_freeze_count() > 0  # the other code's freeze stays
    finally:
        gc.unfreeze()

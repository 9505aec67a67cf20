"""The swap protocol's flag waits against their references (compiled on CUDA; under the interpreter on CPU), and
on CUDA a wait released by another stream."""

import pytest
import torch

if not torch.cuda.is_available():
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()

from morphserve.kernels.stream_flags import (wait_at_least, wait_at_least_ref, wait_flag,  # noqa: E402
                                             wait_flag_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("value", [1, 7, -3])
def test_wait_flag_passes_a_set_flag_and_consumes_it(value):
    got = torch.tensor([value], dtype=torch.int32, device=DEV)
    want = got.clone()
    wait_flag(got)
    wait_flag_ref(want)
    assert got.item() == want.item() == 0


@pytest.mark.parametrize("count,value", [(5, 5), (9, 5), (0, -1)])
def test_wait_at_least_passes_when_reached_and_leaves_the_counter(count, value):
    got = torch.tensor([count], dtype=torch.int32, device=DEV)
    wait_at_least(got, value)
    wait_at_least_ref(got, value)
    assert got.item() == count


def test_references_refuse_to_wait():
    with pytest.raises(RuntimeError, match="flag is 0"):
        wait_flag_ref(torch.zeros(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="counter is 2 < 3"):
        wait_at_least_ref(torch.tensor([2], dtype=torch.int32), 3)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="1-element int32.*torch.int64"):
        wait_flag(torch.ones(1, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match=r"int32\[2\]"):
        wait_at_least(torch.ones(2, dtype=torch.int32, device=DEV), 1)
    with pytest.raises(ValueError, match="value 4294967296"):
        wait_at_least(torch.ones(1, dtype=torch.int32, device=DEV), 1 << 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_waits_are_released_by_another_stream():
    """A wait enqueued before the flag is set holds back later work on its stream until another stream sets it."""
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.zeros(2, dtype=torch.int32, device="cuda")
    waiter, setter = torch.cuda.Stream(), torch.cuda.Stream()
    # load every kernel first: CUDA's lazy loading may make a first launch wait for the device, here for the spin
    wait_flag(torch.ones(1, dtype=torch.int32, device="cuda"))
    wait_at_least(counter, 0)
    out[0:1].copy_(counter)
    out[1:2].fill_(0)
    counter.add_(0)
    torch.cuda._sleep(1)
    torch.cuda.synchronize()
    with torch.cuda.stream(waiter):
        wait_flag(flag)
        out[0:1].copy_(counter)  # must see the counter written before the flag
        wait_at_least(counter, 2)
        out[1:2].fill_(1)
    torch.cuda._sleep(50_000_000)  # the setter starts well after the waits are spinning
    with torch.cuda.stream(setter):
        setter.wait_stream(torch.cuda.current_stream())
        counter.fill_(1)
        flag.fill_(1)
        torch.cuda._sleep(10_000_000)
        counter.add_(1)
    torch.cuda.synchronize()
    assert out.tolist() == [1, 1] and flag.item() == 0 and counter.item() == 2

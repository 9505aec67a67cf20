"""The step's token kernels against their references: the greedy argmax (kernels.argmax vs torch.argmax) and the
feed of sampled tokens into the next step's input (kernels.token_feed vs reference.feed_tokens).

Runs compiled on CUDA, or under the Triton interpreter on CPU.
"""

import pytest
import torch

if not torch.cuda.is_available():
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()

from morphserve.kernels import argmax, token_feed  # noqa: E402
from morphserve.kernels import reference as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("vocab", [1, 5, 2048, 3001, 32000])
def test_greedy_matches_torch_argmax(vocab, monkeypatch):
    """Random rows (first row all ties: index 0), a maximum repeated in the same lane and in other lanes (the
    first wins), rows of -inf, rows with NaN (the first NaN wins, as in PyTorch), +inf beside NaN."""
    monkeypatch.setattr(argmax, "BLOCK", 256 if DEV == "cpu" else argmax.BLOCK)  # several loop iterations
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    x[0] = 1.0
    if vocab > 600:
        x[1, 300] = x[1, 300 + 256] = x[1, 7] = 50.0  # same lane as 300 (stride 256 on CPU), and another lane
        x[2, vocab - 1] = 60.0
        x[5, 100] = float("inf")
        x[5, 400] = float("nan")
        x[6, 500] = x[6, 20] = float("nan")
    x[3] = float("-inf")
    x[4, vocab // 2] = float("nan")
    x = x.to(DEV)
    got = argmax.greedy(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref.greedy(x))
    assert torch.equal(argmax.greedy(x[:, :vocab]), got)


def test_greedy_reads_a_row_stride_and_rejects_bad_input():
    x = torch.randn(3, 64, device=DEV)
    wide = torch.zeros(3, 100, device=DEV)
    wide[:, :64] = x
    assert torch.equal(argmax.greedy(wide[:, :64]), x.argmax(-1))
    assert argmax.greedy(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="contiguous last dim"):
        argmax.greedy(x.t())
    with pytest.raises(ValueError, match="contiguous last dim"):
        argmax.greedy(x[0])
    with pytest.raises(ValueError, match="vocabulary size 0"):
        argmax.greedy(x[:, :0])


def test_feed_tokens_matches_reference():
    feed = torch.tensor([11, 22, 33], device=DEV)
    tokens = torch.tensor([5, -1, -3, 7, -2, -9, 0], device=DEV)  # -9: row 8, clamped to the last row
    want = tokens.clone()
    ref.feed_tokens(want, feed)
    got = tokens.clone()
    token_feed.feed_tokens(got, feed)
    assert torch.equal(got, want) and got.tolist() == [5, 11, 33, 7, 22, 33, 0]
    big = torch.arange(-2500, 2500, device=DEV)  # more rows than one program's block
    want, got = big.clone(), big.clone()
    ref.feed_tokens(want, feed)
    token_feed.feed_tokens(got, feed)
    assert torch.equal(got, want)


def test_feed_tokens_rejects_bad_input():
    feed = torch.tensor([1, 2], device=DEV)
    with pytest.raises(ValueError, match="int64"):
        token_feed.feed_tokens(torch.tensor([-1], dtype=torch.int32, device=DEV), feed)
    with pytest.raises(ValueError, match="int64"):
        token_feed.feed_tokens(torch.tensor([-1], device=DEV), feed.int())
    with pytest.raises(ValueError, match="feed is empty"):
        token_feed.feed_tokens(torch.tensor([-1], device=DEV), feed[:0])

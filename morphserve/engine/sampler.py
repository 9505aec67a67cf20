"""Next-token sampling: greedy (argmax, as transformers' greedy search) or temperature / top-k / top-p; and feeding
sampled tokens still on the device into the next step's input (asynchronous steps)."""

from __future__ import annotations

import torch

from morphserve.engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """``logits``: float32 ``[S, vocab]``; returns one token id per row."""
    if logits.shape[0] == 0:
        return []
    return sample_tensor(logits, params, generators).tolist()


def sample_tensor(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """:func:`sample` without reading the tokens back: int64 ``[S]`` on the logits' device.  Greedy rows never
    synchronise with the device; a sampled row whose generator lives on another device does."""
    out = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        out[row] = _sample_row(logits[row], p, gen)
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    x = logits / p.temperature
    if p.top_k:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, idx, sorted_x)
    probs = x.softmax(-1)
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    return torch.multinomial(probs, 1, generator=gen)[0]


def feed_tokens(tokens: torch.Tensor, feed: torch.Tensor) -> None:
    """Replace the placeholders in a step's device input ``tokens`` in place: ``-(1 + r)`` stands for row ``r`` of
    ``feed``, the tokens the step in flight samples (asynchronous steps; stream order makes them ready).  Device
    operations only: nothing waits for the device."""
    hole = tokens < 0
    rows = (-tokens - 1).clamp_(0, feed.shape[0] - 1)
    tokens.copy_(torch.where(hole, feed.index_select(0, rows), tokens))

"""Next-token sampling: greedy (argmax, as transformers' greedy search) or temperature / top-k / top-p.

The greedy argmax is the kernel set's (:meth:`~morphserve.model.kernel_set.KernelSet.greedy`: ``torch.argmax`` for
the reference set, a Triton kernel for the fast path) when the caller passes it.  Feeding sampled tokens still on
the device into the next step's input (asynchronous steps) is :meth:`KernelSet.feed_tokens`."""

from __future__ import annotations

from typing import Callable

import torch

from morphserve.engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           greedy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[int]:
    """``logits``: float32 ``[S, vocab]``; returns one token id per row.  ``greedy``: the argmax of each row
    (default ``torch.argmax``)."""
    if logits.shape[0] == 0:
        return []
    return sample_tensor(logits, params, generators, greedy).tolist()


def sample_tensor(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  greedy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`sample` without reading the tokens back: int64 ``[S]`` on the logits' device.

    Nothing here waits for the device when every generator lives on the logits' device (the engine creates them
    there): greedy rows are one argmax; the sampled rows are processed together, so a step costs a fixed number of
    launches plus one noise draw per sampled row, whatever the batch.  Each sampled row draws from
    ``softmax(logits / temperature)`` restricted to its top-k tokens (ties at the k-th value kept) and then to the
    smallest prefix, in decreasing probability, whose mass reaches top-p (the first token always kept), by the
    exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` from the row's own generator, which picks ``i``
    with probability ``p_i``.  A row's draw therefore depends only on its logits and its generator, never on the
    other rows of the batch."""
    out = greedy(logits) if greedy is not None else logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    dev, vocab = logits.device, logits.shape[-1]
    sub = [params[i] for i in rows]
    index = None if len(rows) == len(params) else _on(rows, torch.int64, dev)
    x = (logits if index is None else logits.index_select(0, index)).float()
    x = x / _on([p.temperature for p in sub], torch.float32, dev)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in sub]
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in sub]
    if min(top_k) < vocab or min(top_p) < 1.0:
        xs, order = torch.sort(x, dim=-1, descending=True)
        if min(top_k) < vocab:
            kth = xs.gather(1, _on(top_k, torch.int64, dev)[:, None] - 1)
            xs = xs.masked_fill(xs < kth, float("-inf"))
        if min(top_p) < 1.0:
            probs = xs.softmax(-1)
            drop = probs.cumsum(-1) - probs >= _on(top_p, torch.float32, dev)[:, None]
            xs = xs.masked_fill(drop, float("-inf"))
        x = torch.empty_like(xs).scatter_(1, order, xs)  # back to vocabulary order: the race runs there
    noise = torch.stack([_exponential(vocab, dev, g) for g in (generators[i] for i in rows)])
    tok = (x.softmax(-1) / noise).argmax(-1)
    return tok if index is None else out.index_copy_(0, index, tok)


def _on(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` (see :func:`_to`)."""
    return _to(torch.tensor(values, dtype=dtype), device)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``.  A host tensor goes to CUDA through pinned memory with a non-blocking copy: a blocking
    copy from pageable memory would wait for the whole stream (the step still running)."""
    if t.device.type == device.type:
        return t
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _exponential(n: int, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    """``n`` draws of Exp(1) from ``gen`` (the default generator if None), on ``device``, never zero.  A generator
    on the host draws there (no wait for the device either way)."""
    e = torch.empty(n, dtype=torch.float32, device=gen.device if gen is not None else device)
    return _to(e.exponential_(generator=gen).clamp_min_(torch.finfo(torch.float32).tiny), device)

"""Why two greedy runs diverge: rounding at a near tie, or a bug.

Greedy decoding in float16/bfloat16 and in float32 (or with two kernel sets that round differently) need not
produce the same tokens: when the two best next-token logits are nearly equal, rounding can swap them, and every
later token then follows a different prefix.  That is expected.  A bug looks different: the two runs disagree where
the reference has a clear winner.

:func:`analyse` makes the distinction measurable.  For each pair of token sequences it finds the first divergent
step, re-computes the next-token logits for the common prefix (prompt + agreed tokens) in both engines, and reports

* ``margin``: the reference's top-2 logit margin (top-1 minus top-2) at that step;
* ``gap``: the reference's top-1 logit minus its logit for the token the run under test chose (0 when the test
  token is the reference's best; equal to ``margin`` when it is the reference's second);
* ``noise``: the root-mean-square difference between the two engines' logits at that step, over the reference's
  :data:`NOISE_TOP_K` best tokens: the size of the perturbation the lower precision (or the other kernel set)
  actually causes where it matters (rounding errors grow with a logit's magnitude, so the whole vocabulary's
  typical logit would understate it for the top candidates);
* ``scale``: the root-mean-square of the reference's :data:`NOISE_TOP_K` best logits (rounding errors are relative
  to the magnitudes flowing through the model, so the noise rounding can cause grows with it);
* ``near_tie``: ``gap <= NOISE_FACTOR * noise`` (the test token lies inside the band the perturbation spans) **and**
  ``noise <= ROUNDOFF_FACTOR * u * scale``, where ``u`` is the unit roundoff of the lower of the two runs'
  precisions (2^-8 for bfloat16, 2^-11 for float16): the perturbation itself is rounding-sized.

The second condition gives the analysis its power against bugs.  A bug perturbs every logit, so its ``noise`` is
large and a noise band alone would excuse it: a model with one layer's down projection scaled by 3 diverges at
tokens ranked up to 7th inside a band of 4 x noise, but its noise is 14-23% of the logits' scale, and scaled by 1.5
it is 3.6-6%, against at most 2.4 ``u`` (0.9%) for bfloat16 and 1.8 ``u`` (0.09%) for float16 rounding (CPU,
tiny checkpoint, 2026-12-02).  An earlier criterion used the test token's rank instead (only the reference's top two
counted); it rejected three-way ties inside the band, which bfloat16 produces (on an H200: a test token ranked
third, 0.0027 below the best at a noise of 0.0083; on the CPU one ranked fourth, 0.013 below at 0.0105).  The rank
stays in the record.  A subtler bug (a projection scaled by 1.1: 0.7-1.3% of the scale) is inside the bfloat16 band
and passes; at float16 it would not.

A divergence that is a near tie is explained by rounding; one that is not means the two runs compute different
functions.  :data:`NOISE_FACTOR` (4) allows for the difference between the two tokens' errors, which is a sum of
two per-token errors and has a heavier tail than one of them; :data:`ROUNDOFF_FACTOR` (4) allows the rounding of
the many operations between the weights and the logits to add up to a few units of roundoff.  The re-computation
is one prefill per run and divergent prompt, through each engine's own model (its dtype, kernel set and weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from morphserve.engine.engine import LLMEngine
from morphserve.engine.model_runner import HostBatch

NOISE_FACTOR = 4.0
ROUNDOFF_FACTOR = 4.0
NOISE_TOP_K = 16


def unit_roundoff(*dtypes: torch.dtype) -> float:
    """The unit roundoff (half the machine epsilon, ``torch.finfo``) of the least precise of ``dtypes``: 2^-8 for
    bfloat16, 2^-11 for float16, 2^-24 for float32."""
    unknown = [d for d in dtypes if not d.is_floating_point]
    if unknown:
        raise ValueError(f"no unit roundoff known for {unknown} (floating-point dtypes only)")
    return max(torch.finfo(d).eps / 2 for d in dtypes)


@dataclass
class Divergence:
    prompt: int  # index of the prompt
    step: int  # first output position where the runs differ
    token_test: int  # the token the run under test chose
    token_ref: int  # the reference run's token
    margin: float  # reference top-1 minus top-2 logit at that step
    gap: float  # reference top-1 logit minus the reference's logit of token_test
    noise: float  # RMS of (test logits - reference logits) over the reference's top-16 tokens at that step
    scale: float  # RMS of the reference's top-16 logits at that step
    unit_roundoff: float  # of the lower precision of the two runs (or the rounding a test simulates)
    test_rank: int  # rank of token_test in the reference's logits (0: its best)
    near_tie: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where the sequences differ (a length difference counts), or None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def next_token_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """float32 logits ``[vocab]`` (on the CPU) of the token after ``token_ids``, by one eager prefill through the
    engine's model in scratch blocks of its pool (the engine must be idle; the blocks are freed again)."""
    if engine.has_unfinished():
        raise RuntimeError("next_token_logits needs an idle engine (requests are still running)")
    n, bs = len(token_ids), engine.config.block_size
    if not 0 < n < engine.max_model_len:
        raise ValueError(f"need 1..{engine.max_model_len - 1} tokens, got {n}")
    blocks = engine.block_manager.allocate(-(-n // bs))
    try:
        pos = np.arange(n, dtype=np.int64)
        table = np.asarray(blocks, dtype=np.int64)
        hb = HostBatch(np.asarray(token_ids, dtype=np.int64), pos, table[pos // bs] * bs + pos % bs,
                       np.array([0, n], dtype=np.int64), np.array([n], dtype=np.int64), table[None, :],
                       np.array([n - 1], dtype=np.int64), [blocks])
        runner = engine.runner
        logits = runner.model.forward(runner.upload(hb), runner.pool, runner.kernels)
        return logits[0].float().cpu()
    finally:
        engine.block_manager.free_blocks(blocks)


def analyse(test: LLMEngine, ref: LLMEngine, prompts: list[list[int]], tokens_test: list[list[int]],
            tokens_ref: list[list[int]], noise_factor: float = NOISE_FACTOR,
            roundoff: float | None = None) -> list[Divergence]:
    """One :class:`Divergence` per prompt whose greedy outputs differ (see the module docstring).  ``roundoff``:
    the unit roundoff the perturbation is judged against (default: that of the lower of the two engines' dtypes;
    a test that simulates rounding by perturbing weights passes the size of its perturbation)."""
    if not len(prompts) == len(tokens_test) == len(tokens_ref):
        raise ValueError(f"{len(prompts)} prompts, {len(tokens_test)} and {len(tokens_ref)} outputs")
    u = unit_roundoff(test.dtype, ref.dtype) if roundoff is None else roundoff
    out = []
    for i, (p, a, b) in enumerate(zip(prompts, tokens_test, tokens_ref)):
        step = first_divergence(a, b)
        if step is None:
            continue
        if step >= min(len(a), len(b)):
            raise ValueError(f"prompt {i}: one output is a prefix of the other ({len(a)} vs {len(b)} tokens): the "
                             f"runs used different stopping rules, not different tokens")
        prefix = p + b[:step]
        lt, lr = next_token_logits(test, prefix), next_token_logits(ref, prefix)
        out.append(classify(i, step, a[step], b[step], lt, lr, u, noise_factor))
    return out


def classify(prompt: int, step: int, token_test: int, token_ref: int, logits_test: torch.Tensor,
             logits_ref: torch.Tensor, roundoff: float, noise_factor: float = NOISE_FACTOR) -> Divergence:
    """The :class:`Divergence` record of one divergent step from both engines' float32 logits ``[vocab]``;
    ``roundoff``: the unit roundoff the perturbation is judged against (:func:`unit_roundoff`)."""
    if not roundoff > 0:
        raise ValueError(f"roundoff must be positive, got {roundoff}")
    lt, lr = logits_test.float(), logits_ref.float()
    top2 = torch.topk(lr, 2)
    margin = float(top2.values[0] - top2.values[1])
    top = torch.topk(lr, min(NOISE_TOP_K, lr.numel())).indices
    noise = float((lt - lr)[top].pow(2).mean().sqrt())
    scale = float(lr[top].pow(2).mean().sqrt())
    # how far below the reference's best the test token was (normally it is the reference's second; its first
    # when the reference's own decode history rounded the other way)
    gap = float(top2.values[0] - lr[token_test])
    rank = int((lr > lr[token_test]).sum())
    near = gap <= noise_factor * noise and noise <= ROUNDOFF_FACTOR * roundoff * scale
    return Divergence(prompt, step, token_test, token_ref, margin, gap, noise, scale, roundoff, rank, near)

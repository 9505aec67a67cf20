#!/usr/bin/env python3
"""Do accumulated split-K sums and per-head RoPE programs pay?  Batch-1 decode steps, settings alternated (GPU).

A setting is ``reduce`` or ``accumulate``, then optional modifiers joined with ``+``:

* ``reduce``: :data:`morphserve.kernels.gemv.ACCUMULATE_SPLITK` off; every split-K M = 1 GEMV stores float32
  partial sums and a reduce kernel adds them.  ``accumulate``: on; the GEMV programs add them atomically into
  zeroed buffers (one per pair of splits) and the consuming kernel (RoPE + KV store, add-RMSNorm,
  SiLU-and-multiply, the LM head's finish) adds the pairs, rounds and re-zeroes them
  (:mod:`morphserve.kernels.split_accum`; same bits).
* ``two-splits-only``: only two-split products accumulate (:data:`~morphserve.kernels.gemv.ACCUMULATE_MAX_SPLITS`
  2; Llama-2-7B's four-split down projection keeps its reduce kernel, as in the first version).
* ``down(4,1024,split2)`` / ``down(2,1024,split2)``: Llama-2-7B's down projection (the one shape whose table entry
  splits K in four) gets that two-split configuration.
* ``rope-per-token`` / ``rope-per-head``: :data:`morphserve.kernels.kv_store.HEAD_SPLIT_MAX_TOKENS` 0 or as
  shipped (one RoPE program per token, or per token and KV head).
* ``head-gather``: the LM head gathers its rows even in decode steps where every row samples (as before
  :meth:`~morphserve.model.llama.ForwardBatch.samples_every_row`).

For each model one engine with synthetic weights (:func:`bench_fastpath.probe_engine`) times graph-captured
batch-1 steps (context 512) with the settings in turn (:func:`bench_fastpath.alternate_b1`), then profiles one
step of each.  The three runs of 2026-12-03 (BENCHMARKS.md, fast path, twelfth campaign) used, in order::

    --rounds 2 --settings 'reduce,accumulate,accumulate+down(4,1024,split2),accumulate+down(2,1024,split2),'\
'reduce+down(4,1024,split2)'
    --rounds 3 --settings reduce+rope-per-token+head-gather,accumulate+rope-per-token+head-gather,\
accumulate+rope-per-head+head-gather,accumulate+rope-per-head
    --rounds 3    # the default settings

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_accumulate.py --out accumulate.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402
from morphserve.kernels import kv_store as KV  # noqa: E402
from morphserve.model.llama import ForwardBatch  # noqa: E402

DOWN = (4096, 11008, 1)  # Llama-2-7B's down projection at M = 1
DOWN2 = {"(4,1024,split2)": G.GemvConfig(1, 4, 1024, 4, 1, 2), "(2,1024,split2)": G.GemvConfig(1, 2, 1024, 4, 1, 2)}


def _shipped():
    """A function that puts back the switches and table entry the settings change, as this tree ships them."""
    table = G._TABLE.setdefault(torch.cuda.get_device_name(), {}) if torch.cuda.is_available() else {}
    down, flag, most, split, every_row = (table.get(DOWN), G.ACCUMULATE_SPLITK, G.ACCUMULATE_MAX_SPLITS,
                                          KV.HEAD_SPLIT_MAX_TOKENS, ForwardBatch.samples_every_row)

    def restore() -> None:
        G.ACCUMULATE_SPLITK, G.ACCUMULATE_MAX_SPLITS = flag, most
        KV.HEAD_SPLIT_MAX_TOKENS, ForwardBatch.samples_every_row = split, every_row
        if down is None:
            table.pop(DOWN, None)
        else:
            table[DOWN] = down
    return restore, table, split


def parse_setting(name: str):
    """The function that applies setting ``name`` (see ``--settings``): the shipped state, then its parts."""
    base, *mods = name.split("+")
    if base not in ("reduce", "accumulate"):
        raise ValueError(f"setting {name!r}: starts with 'reduce' or 'accumulate', not {base!r}")
    steps = []
    for mod in mods:
        if mod.startswith("down") and mod[4:] in DOWN2:
            steps.append(lambda c=DOWN2[mod[4:]]: TABLE.__setitem__(DOWN, c))
        elif mod in ("rope-per-token", "rope-per-head"):
            steps.append(lambda v=0 if mod == "rope-per-token" else SPLIT: setattr(KV, "HEAD_SPLIT_MAX_TOKENS", v))
        elif mod == "two-splits-only":  # only two-split products accumulate (before pairs of splits)
            steps.append(lambda: setattr(G, "ACCUMULATE_MAX_SPLITS", 2))
        elif mod == "head-gather":  # the head gathers its rows even where every row samples (as before)
            steps.append(lambda: setattr(ForwardBatch, "samples_every_row", lambda self: False))
        else:
            raise ValueError(f"setting {name!r}: unknown modifier {mod!r}")

    def apply() -> None:
        SHIPPED()
        G.ACCUMULATE_SPLITK = base == "accumulate"
        for step in steps:
            step()
    return apply


SHIPPED, TABLE, SPLIT = _shipped()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--settings", default="reduce,accumulate+two-splits-only,accumulate",
                    help="comma-separated settings: 'reduce' or 'accumulate', then optional modifiers (module "
                         "docstring): +down(4,1024,split2), +down(2,1024,split2), +rope-per-token, +rope-per-head, "
                         "+two-splits-only, +head-gather")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_accumulate needs a CUDA GPU")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    try:
        settings = {n: parse_setting(n) for n in a.settings.split(",")}
    except ValueError as e:
        sys.exit(str(e))
    try:
        B.alternate_b1(res, a.models.split(","), settings, a.rounds, a.reps, a.out, dev, key="setting")
        # one profiled step per setting and model (after the timed rounds)
        for model in a.models.split(","):
            eng = B.probe_engine(model, dev)
            rng = np.random.default_rng(1)
            for label, apply in settings.items():
                apply()
                eng.runner.graphs.clear()
                prof = B.profile_decode(eng, 1, 512, rng)
                res.setdefault("profiles", {}).setdefault(model, {})[label] = prof
                print(model, label, {r["kernel"][:24]: (r["calls_per_step"], round(r["us_per_step"]))
                                     for r in prof["top"][:8]}, flush=True)
                a.out.write_text(json.dumps(res, indent=1, default=str))
            del eng
            torch.cuda.empty_cache()
    finally:
        SHIPPED()
    return res


if __name__ == "__main__":
    main()

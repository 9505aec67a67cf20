#!/usr/bin/env python3
"""Launch settings of the small kernels on a batch-1 decode step's critical path, alternated in one engine (GPU).

The critical-path probe (``probe_critical_path.py``) charges a Llama-2-7B batch-1 step about 7 us per layer to
decode attention and 2.7 us to its merge, for 8.6 MB of K/V (2 us at the copy rate), and 3.2-3.7 us to each
add-RMSNorm.  The decode kernel's tuning was chosen by the geometric mean over batches 1-128 with the kernel timed
alone; this probe times settings *inside* graph-captured batch-1 steps (context 512,
:func:`bench_fastpath.alternate_b1`).  A setting is ``base`` (as shipped) or modifiers joined with ``+``, applied
to the decode tuning of both MHA and GQA unless noted:

* ``bn<N>``: keys per loop iteration; ``st<N>``: pipeline stages; ``w<N>``: warps;
* ``ppsm<N>``: programs per multiprocessor the split count aims at; ``maxsplits<N>``: the split cap
  (:data:`~morphserve.kernels.attention.MAX_DECODE_SPLITS`);
* ``nodot``: MHA's query row on the CUDA cores instead of padded onto the tensor cores; ``noprefetch``;
* ``normwarps<N>``: warps of the add-RMSNorm program (:data:`morphserve.kernels.norm.NUM_WARPS`);
* ``normearly`` / ``normlate``: the norm's weight and residual loaded before / after its programmatic-launch wait
  (:data:`morphserve.kernels.norm.EARLY_LOADS`; shipped on since 2026-12-04);

The runs of 2026-12-03 (BENCHMARKS.md, fast path, thirteenth campaign) used ``--settings
base,bn64+st2,bn16,ppsm2,ppsm16+maxsplits32,nodot,normwarps4,normwarps16`` and ``--settings
base,maxsplits1,maxsplits2,maxsplits4,ppsm2,maxsplits4+bn64+st2``; those of 2026-12-04 ``--settings base,normearly``
(early loads then off) and, at commit ``2d22782``, which had a switch for the decode merge in the last program
(``sepmerge`` / ``lastmerge``, since removed), ``--settings base,sepmerge,normlate``.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_b1_small_kernels.py --out small_kernels.json
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import attention as A  # noqa: E402
from morphserve.kernels import norm  # noqa: E402

SHIPPED = (A.DECODE_TUNING, A.DECODE_TUNING_GQA, A.MAX_DECODE_SPLITS, norm.NUM_WARPS, norm.EARLY_LOADS)
FIELDS = {"bn": "block_n", "st": "num_stages", "w": "num_warps", "ppsm": "programs_per_sm"}


def restore() -> None:
    A.DECODE_TUNING, A.DECODE_TUNING_GQA, A.MAX_DECODE_SPLITS, norm.NUM_WARPS, norm.EARLY_LOADS = SHIPPED


def parse_setting(name: str):
    """The function that applies setting ``name`` (module docstring) on top of the shipped state."""
    changes, splits, warps, early = {}, None, None, None  # early None: as shipped
    for mod in ([] if name == "base" else name.split("+")):
        m = re.fullmatch(r"(bn|st|w|ppsm|maxsplits|normwarps)(\d+)", mod)
        if m and m.group(1) in FIELDS:
            changes[FIELDS[m.group(1)]] = int(m.group(2))
        elif m and m.group(1) == "maxsplits":
            splits = int(m.group(2))
        elif m:
            warps = int(m.group(2))
        elif mod == "nodot":
            changes["mha_dot"] = False
        elif mod == "noprefetch":
            changes["prefetch"] = False
        elif mod in ("normearly", "normlate"):
            early = mod == "normearly"
        else:
            raise ValueError(f"setting {name!r}: unknown modifier {mod!r}")

    def apply() -> None:
        restore()
        A.DECODE_TUNING = dataclasses.replace(SHIPPED[0], **changes)
        A.DECODE_TUNING_GQA = dataclasses.replace(SHIPPED[1], **{k: v for k, v in changes.items() if k != "mha_dot"})
        if splits is not None:
            A.MAX_DECODE_SPLITS = splits
        norm.NUM_WARPS = warps
        if early is not None:
            norm.EARLY_LOADS = early
    return apply


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b")
    ap.add_argument("--settings", default="base,normlate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_b1_small_kernels needs a CUDA GPU")
    try:
        settings = {n: parse_setting(n) for n in a.settings.split(",")}
    except ValueError as e:
        sys.exit(str(e))
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    try:
        B.alternate_b1(res, a.models.split(","), settings, a.rounds, a.reps, a.out, dev, key="setting")
    finally:
        restore()
    return res


if __name__ == "__main__":
    main()

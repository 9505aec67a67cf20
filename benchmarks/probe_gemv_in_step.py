#!/usr/bin/env python3
"""Which M = 1 GEMV configuration is fastest *inside* a decode step?  (GPU only.)

The shipped tuning table (``morphserve/kernels/gemv_tuning.json``) was chosen by timing each projection alone
(``bench_fastpath.py --tune-gemv``: ``triton.testing.do_bench``, L2 flushed, no programmatic dependent launch).
In a graph-captured decode step each GEMV starts while the kernel before it finishes, so another configuration
may win there.  For each model this probe builds one engine with synthetic weights and, for each candidate of
:data:`morphserve.kernels.gemv.CANDIDATES` at M = 1, installs it for every projection shape of the model that the
table sends to Triton, recaptures the graphs and times batch-1 steps (:func:`bench_fastpath.decode_sweep`, context
512).  The shipped table runs first and last, so drift shows.

``--descent`` searches per shape instead (largest first, the candidates of :data:`DESCENT`, the other shapes
fixed), then times the shipped and the found table alternately three times; ``--write-tuning`` merges the found
M = 1 entries into a tuning file (how the shipped ``gemv_tuning.json`` got its M = 1 entries).

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_gemv_in_step.py --out in_step.json
    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_gemv_in_step.py --descent \
        --write-tuning morphserve/kernels/gemv_tuning.json --out descent.json
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
from morphserve.model.config import architecture  # noqa: E402


# --descent: the shapes' candidates (the sweep's M = 1 candidates, plus split-K neighbours of the uniform winner)
DESCENT = [G.GemvConfig(1, *c) for c in [(4, 1024, 4, 1, 2), (8, 512, 4, 1, 1), (4, 1024, 4, 1, 1), (4, 1024, 4, 1, 4),
                                         (2, 1024, 4, 1, 2), (4, 512, 4, 1, 2), (2, 2048, 4, 1, 2), (4, 2048, 8, 1, 2),
                                         (4, 1024, 8, 1, 2), (4, 1024, 2, 1, 2), (8, 512, 4, 1, 2), (2, 1024, 4, 1, 4)]]


def with_config(base: dict, shapes, config: "G.GemvConfig | None") -> dict:
    """The tuning table ``base`` with ``config`` for every M = 1 entry of ``shapes`` that ``base`` sends to Triton
    (shapes left to cuBLAS stay there; None: ``base`` unchanged)."""
    if config is None:
        return dict(base)
    return base | {(n, k, 1): config for n, k in shapes if base.get((n, k, 1), True) is not None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--descent", action="store_true",
                    help="instead of uniform configurations: per shape (largest first), try each of DESCENT, keep "
                         "the fastest unless within --keep of the current one; then time shipped vs found 3 times")
    ap.add_argument("--keep", type=float, default=0.005)
    ap.add_argument("--write-tuning", type=Path, default=None, help="with --descent: merge the found M = 1 "
                    "entries into this tuning file")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_gemv_in_step needs a CUDA GPU")
    dev = torch.device("cuda")
    dev_name = torch.cuda.get_device_name(dev)
    res = B.probe_start(a, dev)
    bw = res["copy"]["tb_per_s"] * 1e12
    shipped = dict(G._TABLE.get(dev_name, {}))
    found = dict(shipped)
    searched: set[tuple[int, int]] = set()  # shapes an earlier model already searched start from its choice

    def b1_row(eng, rng, table: dict, reps: int) -> dict:
        """One batch-1 sweep with ``table`` installed (graphs recaptured: configs are captured launches)."""
        G._TABLE[dev_name] = dict(table)
        return B.b1_step(eng, reps, bw, rng)

    try:
        for model in a.models.split(","):
            shapes = set(B.projection_shapes(architecture(model)).values())
            eng = B.probe_engine(model, dev)
            rng = np.random.default_rng(0)
            runs = res.setdefault(model, [])
            if not a.descent:
                for v in [None, *G.CANDIDATES[1], None]:  # None: the shipped table, first and last
                    row = b1_row(eng, rng, with_config(shipped, shapes, v), a.reps)
                    runs.append({"config": str(v) if v else "shipped", "row": row})
                    print(model, v or "shipped", round(row["step_gpu_s"] * 1e3, 3), round(row["gpu_over_floor"], 3),
                          flush=True)
                    a.out.write_text(json.dumps(res, indent=1, default=str))
            else:
                tuned = [(n, k) for n, k in shapes if shipped.get((n, k, 1), True) is not None]
                found.update({(n, k, 1): DESCENT[0] for n, k in tuned if (n, k) not in searched})
                for n, k in sorted(tuned, key=lambda s: -s[0] * s[1]):
                    times = {c: b1_row(eng, rng, found | {(n, k, 1): c}, a.reps)["step_gpu_s"] for c in DESCENT}
                    best = min(times, key=times.get)
                    if times[best] < times[found[(n, k, 1)]] * (1 - a.keep):
                        found[(n, k, 1)] = best
                    searched.add((n, k))
                    runs.append({"shape": [n, k], "times_s": {str(c): t for c, t in times.items()},
                                 "chosen": str(found[(n, k, 1)])})
                    print(model, (n, k), "->", found[(n, k, 1)], round(times[found[(n, k, 1)]] * 1e3, 3), flush=True)
                    a.out.write_text(json.dumps(res, indent=1, default=str))
                check = res.setdefault(f"{model}_check", [])
                for name, table in [("shipped", shipped), ("found", found)] * 3:
                    row = b1_row(eng, rng, table, 2 * a.reps)
                    check.append({"table": name, "row": row})
                    print(model, name, round(row["step_gpu_s"] * 1e3, 3), round(row["gpu_over_floor"], 3), flush=True)
                a.out.write_text(json.dumps(res, indent=1, default=str))
            del eng
            torch.cuda.empty_cache()
        if a.descent:
            res["found_m1"] = [{"n": n, "k": k, "m": m, "config": str(c)} for (n, k, m), c in sorted(found.items())
                               if m == 1]
            a.out.write_text(json.dumps(res, indent=1, default=str))
            if a.write_tuning:  # this device's rows become the found table (only M = 1 entries differ)
                G._TABLE[dev_name] = found
                data = json.loads(a.write_tuning.read_text())
                data[dev_name] = G.tuning_rows(dev_name)
                a.write_tuning.write_text(json.dumps(data, indent=1))
    finally:
        G._TABLE[dev_name] = shipped
    return res


if __name__ == "__main__":
    main()

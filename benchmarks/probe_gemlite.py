"""Does a maintained Triton low-bit library meet issue #3's kernel targets?  gemlite against cuBLAS FP16 and
MorphServe's own W4/W8 dispatcher, in one process, with the same timer (GPU only).

Issue #3 allows "a maintained Triton low-bit library such as gemlite ... if it meets the targets with our memory
layout".  This probe answers the first half (speed) before any layout work: for the projection shapes of the chosen
models and every M in ``--m`` it times

* FP16: ``torch.mm(x, W.T)`` (cuBLAS), before and after the quantized runs (the smaller median is used);
* MorphServe W4 / W8: the dispatcher's autotuner over all its paths (``morphserve.quant.dispatch.autotune``), the
  chosen kernel's median;
* gemlite W4 (4-bit codes, group 128, asymmetric zero points: the same numbers as our W4 weight, packed by gemlite
  into its own layout) and gemlite W8 (int8, one scale per output channel), each through every gemlite matmul type
  that accepts the batch size (``GEMV``, ``GEMV_REVSPLITK``, ``GEMV_SPLITK``, ``GEMM_SPLITK``, ``GEMM``, with
  gemlite's own autotuning) and through its automatic choice.

Every candidate's output is checked against the float32 product with the exactly dequantized weight first; a
candidate that fails the check or raises is recorded with its error and not timed.  Times are medians of
``--reps`` CUDA-event-timed runs after an L2 flush (:class:`morphserve.quant.dispatch.Timer`).  gemlite has no
tuned configurations for the H200: the probe loads its H100 file (same SM 9.0) and lets gemlite autotune the rest.

gemlite is not a dependency of MorphServe: install it (``pip install --no-deps gemlite==0.6.0.post2``; it needs
only numpy, tqdm and triton>=3.6.0) or put its unpacked sources on ``PYTHONPATH``.  Its autotuning costs about a
minute per (shape, M) cell on an H200, so the full default grid (49 cells) takes most of an hour.

    PYTHONPATH=. python3 benchmarks/probe_gemlite.py --out benchmarks/results/gemlite_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from morphserve.memory.weight_arena import Precision
from morphserve.model.config import architecture
from morphserve.provenance import provenance
from morphserve.quant import dispatch
from morphserve.quant.layouts import projection_shapes, w4_group_size
from morphserve.quant.packing import unpack_w4

GEMLITE_TYPES = ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK", "GEMM_SPLITK", "GEMM")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama2-7b", "llama3-8b"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def gemlite_layers(wq: dict[str, dispatch.QuantWeight], dtype: torch.dtype) -> dict[str, Any]:
    """gemlite modules holding the same quantized numbers as our W4 / W8 weights."""
    import gemlite
    from gemlite import DType
    gd = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[dtype]
    w4, w8 = wq["w4"], wq["w8"]
    n, k, g = w4.n, w4.k, w4.group_size
    l4 = gemlite.GemLiteLinear(4, group_size=g, in_features=k, out_features=n, input_dtype=gd, output_dtype=gd)
    # W = (q - z) * s with per-(group, column) s and z: gemlite's [N, K // G] meta layout; fma_mode=False keeps that
    # exact form (its default folds -z * s into one rounded offset)
    l4.pack(unpack_w4(w4.qweight, g), w4.scales.t().contiguous(), w4.zeros.t().contiguous(), fma_mode=False)
    n8, k8 = w8.qweight.shape
    l8 = gemlite.GemLiteLinear(8, group_size=k8, in_features=k8, out_features=n8, input_dtype=gd, output_dtype=gd)
    l8.pack(w8.qweight, w8.scales.view(n8, 1), zeros=None)
    return {"w4": l4, "w8": l8}


def time_candidate(fn: Callable[[], torch.Tensor], want: torch.Tensor, timer: dispatch.Timer) -> dict[str, Any]:
    try:
        err = dispatch._rel_err(fn(), want)
    except Exception as e:  # noqa: BLE001  (a candidate gemlite rejects is a result, not a crash)
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    if not err <= 1e-2:
        return {"error": f"relative error {err:.3g} against the float32 reference", "rel_err": err}
    return {"us": timer.median_us(fn), "rel_err": err}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_gemlite needs a CUDA GPU (gemlite imports only with one)")
    import gemlite
    from tqdm import tqdm
    h100 = Path(gemlite.__file__).parent / "configs" / "h100.json"
    loaded = gemlite.GemLiteLinear.load_config(str(h100)) if h100.exists() else False
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float16
    timer = dispatch.Timer(device, reps=args.reps)
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for model in args.models:
        cfg = architecture(model)
        for proj, (n, k) in projection_shapes(cfg).items():
            shapes.setdefault((n, k, w4_group_size(cfg)), []).append(f"{model}/{proj}")
    res: dict[str, Any] = {"provenance": provenance(config=vars(args) | {"out": str(args.out)}, device=device),
                           "gemlite": getattr(gemlite, "__version__", "?"), "gemlite_config": str(h100),
                           "gemlite_config_loaded": loaded, "device": torch.cuda.get_device_name(device),
                           "command": " ".join(sys.argv), "rows": []}
    t0 = time.time()
    bar = tqdm(total=len(shapes) * len(args.m), desc="shapes x M")
    for (n, k, g), users in shapes.items():
        w16 = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        wq = {"w8": dispatch.random_weight(Precision.W8, n, k, 0, dtype, device, seed=1),
              "w4": dispatch.random_weight(Precision.W4, n, k, g, dtype, device, seed=2)}
        exact = {p: w.dequantize().float() for p, w in wq.items()}
        gl = gemlite_layers(wq, dtype)
        for m in args.m:
            x = torch.randn(m, k, device=device).to(dtype)
            row: dict[str, Any] = {"users": users, "n": n, "k": k, "group_size": g, "m": m}
            fp16_a = timer.median_us(lambda: torch.mm(x, w16.t()))
            for p in ("w4", "w8"):
                want = x.float() @ exact[p].t()
                choice = dispatch.autotune(wq[p], dtype, m, timer)
                ours = {"chosen": choice.path, "us": choice.us}
                layer = gl[p]
                cands = {t: time_candidate(lambda t=t: layer.forward_manual(x, t), want, timer) for t in GEMLITE_TYPES}
                auto = time_candidate(lambda: layer.forward_auto_no_warmup(x), want, timer)
                ok = {t: c["us"] for t, c in cands.items() if "us" in c}
                best = min(ok, key=ok.get) if ok else None
                row[p] = {"morphserve": ours, "gemlite_auto": auto, "gemlite_types": cands,
                          "gemlite_best": {"type": best, "us": ok[best]} if best else None}
            fp16_b = timer.median_us(lambda: torch.mm(x, w16.t()))
            row["fp16_us"] = min(fp16_a, fp16_b)
            row["fp16_runs"] = [fp16_a, fp16_b]
            for p in ("w4", "w8"):
                r = row[p]
                r["speedup_morphserve"] = row["fp16_us"] / r["morphserve"]["us"]
                if r["gemlite_best"]:
                    r["speedup_gemlite_best"] = row["fp16_us"] / r["gemlite_best"]["us"]
                if "us" in r["gemlite_auto"]:
                    r["speedup_gemlite_auto"] = row["fp16_us"] / r["gemlite_auto"]["us"]
            res["rows"].append(row)
            bar.update()
            print(f"{n}x{k} M={m}: fp16 {row['fp16_us']:.1f} us | " + " | ".join(
                f"{p} ours {row[p]['speedup_morphserve']:.2f}x gemlite best "
                f"{row[p].get('speedup_gemlite_best', float('nan')):.2f}x "
                f"({(row[p]['gemlite_best'] or {}).get('type')}) "
                f"auto {row[p].get('speedup_gemlite_auto', float('nan')):.2f}x"
                for p in ("w4", "w8")), flush=True)
            res["elapsed_s"] = time.time() - t0
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1, default=str))  # a run cut short keeps every finished row
        del w16, wq, exact, gl
        torch.cuda.empty_cache()
    bar.close()
    return res


if __name__ == "__main__":
    main()

"""Quality of the quantized layer variants on the real SmolLM2-135M: perplexity and per-layer output error.

Measures, on CPU in float32 (the engine's CPU compute dtype; "fp16" names the unquantized variant):

1. perplexity on held-out Multi-News text (:func:`morphserve.eval.perplexity.heldout_text`) for the unquantized
   model, all layers W8 (RTN), all layers W4 RTN and all layers W4 AWQ (llm-compressor, calibrated on QMSum test
   transcripts, :mod:`morphserve.quant.calibrate`), through transformers with each variant's dequantized weights;
2. the per-layer output error of each variant on real activations with the FP16 input
   (:mod:`morphserve.eval.layer_error`);
3. an engine-path check: the engine's own forward (arena + reference W4 kernel) with every layer at W4 AWQ gives the
   same NLL as the transformers route on the first ``--engine-check-tokens`` tokens;
4. the slot fraction each variant occupies (SmolLM2 and Llama-2-7B shapes).

Writes ``benchmarks/results/quant_quality.json`` (with provenance) and prints a Markdown table.  Rerunnable: the AWQ
checkpoint is cached (``cache_dir()/quant``); everything else is recomputed.

    MORPHSERVE_DATA_MIRROR=../shared/data .venv/bin/python benchmarks/quant_quality.py
    # defaults: 20 x 1024 evaluation tokens, AWQ calibrated on 8 x 256 tokens, 20 grid points
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
from morphserve.eval.layer_error import capture_layers, layer_errors
from morphserve.eval.perplexity import NLL, heldout_text, load_layer_weights, nll_engine, nll_hf
from morphserve.memory.weight_arena import Precision
from morphserve.model.config import architecture
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import open_source
from morphserve.provenance import provenance
from morphserve.quant.calibrate import quantize_checkpoint, read_quant_provenance
from morphserve.quant.layouts import slot_fraction, w4_group_size
from morphserve.quant.staging import StagedVariants
from morphserve.quant.variants import dequantize_variant, open_w4_checkpoint, v_row_scale_drift

RESULTS = Path(__file__).resolve().parent / "results" / "quant_quality.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--first-doc", type=int, default=0, help="first Multi-News example of the evaluation text")
    ap.add_argument("--batch-size", type=int, default=4)
    # 8 x 256 calibration tokens keep llm-compressor's AWQ grid search to about 20 minutes on 2 shared CPU cores
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ grid points per scale search")
    ap.add_argument("--layer-error-windows", type=int, default=2, help="windows used for the per-layer error")
    ap.add_argument("--engine-check-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    source = open_source(args.model)
    model_dir = getattr(source, "path", None)
    if source.synthetic or model_dir is None:
        raise SystemExit(f"{args.model}: quality needs a real checkpoint directory (synthetic weights are random)")
    cfg = source.config
    dtype, device = torch.float32, torch.device("cpu")
    model = LlamaModel(source, dtype, device)
    tok = source.tokenizer()

    print(f"[quant_quality] AWQ calibration of {model_dir} (cached after the first run)", file=sys.stderr)
    t = time.time()
    awq_dir = quantize_checkpoint(model_dir, "awq", num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                                  n_grid=args.n_grid, name=args.model)
    awq_prov = read_quant_provenance(awq_dir)
    calib_s = time.time() - t

    staged = StagedVariants.build(model, "rtn")
    staged_awq = StagedVariants.build(model, open_w4_checkpoint(awq_dir), precisions=(Precision.W4,),
                                      calibration=awq_prov)
    variants = {  # name -> (store, precision)
        "fp16": (staged, Precision.FP16), "w8-rtn": (staged, Precision.W8), "w4-rtn": (staged, Precision.W4),
        "w4-awq": (staged_awq, Precision.W4),
    }
    dense = {name: [dequantize_variant(store.tensors(i, p), p, cfg) for i in range(cfg.num_layers)]
             for name, (store, p) in variants.items()}

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def load(name: str, layers: range | list[int]) -> None:
        for i in layers:
            load_layer_weights(hf, i, dense[name][i], cfg.q_size, cfg.kv_size, cfg.intermediate_size)

    text = heldout_text(tok, args.windows, args.seq_len, first_doc=args.first_doc)
    all_layers = range(cfg.num_layers)
    ppl: dict[str, dict[str, float]] = {}
    for name in variants:
        load(name, all_layers)
        t = time.time()
        nll = nll_hf(hf, text.windows, args.batch_size, desc=f"perplexity {name}")
        ppl[name] = {"perplexity": nll.perplexity, "nll_per_token": nll.mean, "tokens": nll.tokens,
                     "seconds": time.time() - t}
        print(f"[quant_quality] {name}: perplexity {nll.perplexity:.4f}", file=sys.stderr)
    load("fp16", all_layers)

    captures = capture_layers(hf, text.windows[:args.layer_error_windows])
    per_layer: dict[str, list[dict[str, float | int]]] = {}
    for name in ("w8-rtn", "w4-rtn", "w4-awq"):
        errs = layer_errors(hf, captures, lambda i, n=name: load(n, [i]), lambda i: load("fp16", [i]),
                            desc=f"layer error {name}")
        per_layer[name] = [e.to_json() for e in errs]
    del captures

    # engine path: every layer at W4 AWQ in the arena, the engine's forward with the registered W4 kernel
    n_check = min(args.engine_check_tokens, args.seq_len)
    check_ids = text.windows[0][:n_check]
    for i in all_layers:
        staged_awq.write_into(model.arena, i, Precision.W4)
    engine_nll = nll_engine(model, check_ids)
    for i in all_layers:
        staged.write_into(model.arena, i, Precision.FP16)
    load("w4-awq", all_layers)
    hf_nll: NLL = nll_hf(hf, [check_ids])
    load("fp16", all_layers)

    drift = {name: [v_row_scale_drift(dense["fp16"][i], dense[name][i], cfg) for i in all_layers]
             for name in ("w8-rtn", "w4-rtn", "w4-awq")}
    fractions = {m: {p.value: slot_fraction(p, architecture(m) if m != args.model else cfg, torch.float16)
                     for p in (Precision.W8, Precision.W4)} for m in (args.model, "llama2-7b")}

    result = {
        "provenance": provenance(config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                 device=device, synthetic_weights=False),
        "model": {"name": args.model, "description": source.description, "checkpoint": str(model_dir),
                  "compute_dtype": str(dtype), "w4_group_size": w4_group_size(cfg)},
        "eval_text": text.provenance(),
        "awq": {"checkpoint": str(awq_dir), "calibration_seconds_this_run": calib_s,
                **{k: awq_prov.get(k) for k in ("method", "group_size", "n_grid", "duo_scaling", "mappings",
                                                 "calibration", "llmcompressor", "weights_sha256")}},
        "perplexity": ppl,
        "awq_beats_rtn": ppl["w4-awq"]["perplexity"] < ppl["w4-rtn"]["perplexity"],
        "engine_check": {"variant": "w4-awq (all layers)", "tokens": engine_nll.tokens,
                         "engine_nll_per_token": engine_nll.mean, "transformers_nll_per_token": hf_nll.mean,
                         "abs_diff": abs(engine_nll.mean - hf_nll.mean)},
        "per_layer_error": per_layer,
        "v_row_scale_drift": drift,
        "slot_fraction_fp16_dtype": fractions,
        "host_staging_bytes": {p.value: staged.nbytes(p) for p in Precision} | {"w4-awq": staged_awq.nbytes()},
        "seconds_total": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    ppl, per = r["perplexity"], r["per_layer_error"]
    base = ppl["fp16"]["perplexity"]
    lines = [
        f"Perplexity of {r['model']['name']} on {r['eval_text']['scored_tokens']} held-out Multi-News tokens "
        f"({r['eval_text']['num_windows']} x {r['eval_text']['seq_len']}), CPU float32; per-layer error on the first "
        f"{r['provenance']['config']['layer_error_windows']} windows with each layer's FP16 input (mean / worst "
        f"layer over {len(per['w4-rtn'])} layers).",
        "",
        "| variant | perplexity | vs fp16 | layer out rel. L2 mean / max | layer out cosine mean / min "
        "| layer update rel. L2 mean / max | slot fraction (fp16 dtype) |",
        "|---|---|---|---|---|---|---|",
    ]
    frac = r["slot_fraction_fp16_dtype"][r["model"]["name"]]
    for name in ("fp16", "w8-rtn", "w4-rtn", "w4-awq"):
        p = ppl[name]["perplexity"]
        if name == "fp16":
            lines.append(f"| {name} | {p:.3f} | - | - | - | - | 1.000 |")
            continue
        e = per[name]
        rel = [x["rel_l2"] for x in e]
        cos = [x["cosine"] for x in e]
        upd = [x["update_rel_l2"] for x in e]
        lines.append(f"| {name} | {p:.3f} | {100 * (p / base - 1):+.2f}% | {sum(rel) / len(rel):.4f} / "
                     f"{max(rel):.4f} | {sum(cos) / len(cos):.5f} / {min(cos):.5f} | {sum(upd) / len(upd):.4f} / "
                     f"{max(upd):.4f} | {frac[name.split('-')[0]]:.3f} |")
    ec = r["engine_check"]
    lines += ["", f"Engine path check ({ec['variant']}, {ec['tokens']} tokens): engine NLL/token "
                  f"{ec['engine_nll_per_token']:.6f}, transformers {ec['transformers_nll_per_token']:.6f} "
                  f"(|diff| {ec['abs_diff']:.2e}).",
              f"Llama-2-7B slot fractions (fp16): W8 {r['slot_fraction_fp16_dtype']['llama2-7b']['w8']:.3f}, "
              f"W4 {r['slot_fraction_fp16_dtype']['llama2-7b']['w4']:.3f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Perplexity after swapping ``k`` layers in each swap order, on held-out text, with paired bootstrap intervals.

For one model (default SmolLM2-135M, CPU, float32) and each quantized precision (W4 round-to-nearest by default or
the W4 variants of a checkpoint, and W8):

1. **Orders on calibration text.**  Every strategy of :mod:`morphserve.importance.orders` (LIS, KL-greedy,
   contiguous block, front-to-back, back-to-front, random with a fixed seed) builds its order.  Data-driven ones
   see only the calibration windows: the first ``--calib-seq-len`` tokens of the first ``--calib-windows`` QMSum
   test-split meetings; the greedy and block searches use the first ``--search-windows`` of them (LIS and the
   contiguous block evaluate the same number of candidate configurations, ``L (L + 1) / 2``).  LIS here is exactly
   what ``morphserve profile`` computes with the same settings.
2. **Evaluation on held-out text.**  For ``k`` in ``--ks`` the first ``k`` layers of each order are quantized and
   perplexity is measured on the first ``--eval-seq-len`` tokens of each of the first ``--eval-docs`` documents of
   an *evaluation* pool (default Multi-News; one window per document), every token after the first scored given
   the tokens before it in its window.  All configurations are evaluated in one prefix-sharing sweep per chunk of
   windows (:mod:`morphserve.importance.sweep`) through the engine's decoder layers
   (:mod:`morphserve.importance.runner`); one configuration is cross-checked against the engine's own forward
   (:func:`morphserve.eval.perplexity.nll_engine`) after swapping its layers in place.
3. **Statistics** (:mod:`morphserve.importance.bootstrap`): perplexity with a 95% percentile bootstrap interval
   over documents; for every other order, the paired ratio ``ppl(order) / ppl(LIS) - 1`` per ``k`` (same
   resampled documents for both), its verdict (LIS better / worse only when the whole interval excludes 0;
   otherwise a tie) and the mean over ``k`` of the log ratio.  There is no correction for the number of
   comparisons: read single-``k`` verdicts with that in mind.

Writes ``benchmarks/results/order_study.json`` (orders with their calibration records, per-document NLLs, every
interval, the settings and provenance) and prints Markdown tables.  Orders and finished evaluation chunks are
cached under ``cache_dir()/order_study/`` by a key over the settings, the token hashes and this code, so an
interrupted run resumes; ``--no-cache`` recomputes.

    MORPHSERVE_DATA_MIRROR=../shared/data .venv/bin/python benchmarks/order_study.py
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
from morphserve.importance import bootstrap
from morphserve.importance.cli import w4_variant_tag
from morphserve.importance.orders import STRATEGIES, CalibrationData, OrderResult, make_strategy
from morphserve.importance.profile import profile_document, profile_path, write_profile
from morphserve.importance.runner import Config, LayerRunner, quantized_config
from morphserve.importance.sweep import SweepStats, distinct_configs, sweep, tree_nodes
from morphserve.importance.texts import TokenWindows, calibration_windows, document_windows
from morphserve.memory.weight_arena import Precision
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import open_source
from morphserve.paths import cache_dir
from morphserve.provenance import provenance
from morphserve.quant.staging import StagedVariants

RESULTS = Path(__file__).resolve().parent / "results" / "order_study.json"
ORDERS = ("lis", "front-to-back", "back-to-front", "random", "contiguous-block", "kl-greedy")
REFERENCE = "lis"
CODE_FILES = ("runner.py", "sweep.py", "metrics.py", "orders.py", "texts.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precisions", default="w4,w8", help="comma-separated quantized precisions")
    ap.add_argument("--w4", default="rtn", help="W4 variants: 'rtn' or a W4 checkpoint directory (e.g. AWQ)")
    ap.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated; must include {REFERENCE}")
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--ks", default=",".join(str(k) for k in range(2, 25, 2)), help="comma-separated k values")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--search-windows", type=int, default=2)
    ap.add_argument("--normalisation", default="rank", choices=("rank", "minmax"))
    ap.add_argument("--eval-task", default="multi_news", choices=("multi_news", "gov_report", "qmsum", "dureader"))
    ap.add_argument("--eval-docs", type=int, default=40)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-chunk", type=int, default=2, help="evaluation windows per sweep (memory bound)")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--bootstrap-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--write-profiles", action="store_true",
                    help="also save the LIS orders as profiles (cache_dir()/profiles, as `morphserve profile`)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    a.precision_list = [Precision(p) for p in a.precisions.split(",")]
    if any(p == Precision.FP16 for p in a.precision_list):
        raise SystemExit("--precisions lists quantized precisions (w8, w4)")
    a.order_list = a.orders.split(",")
    unknown = [o for o in a.order_list if o not in STRATEGIES]
    if unknown or REFERENCE not in a.order_list:
        raise SystemExit(f"--orders: unknown {unknown} or missing {REFERENCE!r}; known: {', '.join(STRATEGIES)}")
    a.k_list = sorted({int(k) for k in a.ks.split(",")})
    return a


# ---- caching -----------------------------------------------------------------------------------------------------

def code_sha256() -> str:
    """sha256 over the syntax trees of the code that computes orders and NLLs, docstrings left out: a change of
    behaviour invalidates the cache, a change of documentation or comments does not."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent.parent / "morphserve" / "importance"
    for name in CODE_FILES:
        tree = ast.parse((pkg / name).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        h.update(name.encode() + ast.dump(tree).encode())
    return h.hexdigest()


def cache_file(kind: str, key: dict[str, Any], enabled: bool) -> Path | None:
    if not enabled:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "order_study" / f"{kind}-{digest}.json"


def read_cache(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def write_cache(path: Path | None, value: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)


# ---- the study ---------------------------------------------------------------------------------------------------

def build_orders(a: argparse.Namespace, runner: LayerRunner, data: CalibrationData,
                 base_key: dict[str, Any]) -> dict[str, dict[str, OrderResult]]:
    n = runner.num_layers
    out: dict[str, dict[str, OrderResult]] = {}
    for p in a.precision_list:
        out[p.value] = {}
        for name in a.order_list:
            kwargs: dict[str, Any] = {"seed": a.random_seed} if name == "random" else {}
            if name == "lis":
                kwargs["normalisation"] = a.normalisation
            strategy = make_strategy(name, **kwargs)
            path = cache_file("order", {**base_key, "precision": p.value, "strategy": name,
                                        "settings": strategy.settings()}, not a.no_cache)
            cached = read_cache(path)
            if cached is not None:
                result = OrderResult(**cached)
            else:
                result = strategy.build(n, p, data if strategy.uses_calibration else None)
                write_cache(path, result.to_json())
            out[p.value][name] = result
            print(f"[order_study] {p.value} {name}: {result.order} ({result.seconds:.0f} s, "
                  f"{result.token_layers / 1e6:.2f} M token-layers{', cached' if cached else ''})", file=sys.stderr)
    return out


def study_configs(a: argparse.Namespace, n: int, orders: dict[str, dict[str, OrderResult]]) -> dict[str, Config]:
    """Name -> configuration: ``fp16``, ``<precision>/all``, ``<precision>/<order>/k<k>``."""
    configs: dict[str, Config] = {"fp16": (Precision.FP16,) * n}
    for p in a.precision_list:
        configs[f"{p.value}/all"] = (p,) * n
        for name, result in orders[p.value].items():
            for k in a.k_list:
                configs[f"{p.value}/{name}/k{k}"] = quantized_config(n, result.order[:k], p)
    return configs


def evaluate(a: argparse.Namespace, runner: LayerRunner, heldout: TokenWindows, configs: dict[str, Config],
             base_key: dict[str, Any]) -> tuple[dict[str, list[float]], SweepStats, float]:
    """Per-document summed NLL (nats) of every configuration."""
    unique = distinct_configs(list(configs.values()))
    per_config: dict[Config, list[float]] = {c: [] for c in unique}
    stats = SweepStats()
    t0 = time.perf_counter()
    chunks = range(0, heldout.num_windows, a.eval_chunk)
    key = {**base_key, "eval": heldout.provenance()["tokens_sha256"], "configs": [[p.value for p in c] for c in unique]}
    for first in tqdm(chunks, desc="evaluation chunks", unit="chunk"):
        count = min(a.eval_chunk, heldout.num_windows - first)
        path = cache_file("chunk", {**key, "first": first, "count": count}, not a.no_cache)
        cached = read_cache(path)
        if cached is None:
            tokens = heldout.tensor(first, count).to(runner.device)
            targets = tokens[:, 1:]

            def nll(hidden: torch.Tensor) -> list[float]:
                logits = runner.logits(hidden[:, :-1])
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
                return [float(x) for x in ce.view(count, -1).double().sum(dim=1)]

            values, s = sweep(runner, runner.embed(tokens), unique, nll, desc=f"windows {first}..{first + count - 1}")
            stats.add(s)
            cached = [list(v) for v in values]
            write_cache(path, cached)
        for c, v in zip(unique, cached):
            per_config[c].extend(v)
    return {name: per_config[c] for name, c in configs.items()}, stats, time.perf_counter() - t0


def engine_check(model: LlamaModel, staged: StagedVariants, runner: LayerRunner, heldout: TokenWindows,
                 config: Config) -> dict[str, Any]:
    """NLL of window 0 under ``config``: the runner vs the engine's forward with the layers swapped in place."""
    from morphserve.eval.perplexity import nll_engine

    ids = heldout.tensor(0, 1)
    (hidden,) = runner.run(ids, config)
    logits = runner.logits(hidden[0, :-1])
    ours = float(F.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum").double())
    for i, p in enumerate(config):
        staged.write_into(model.arena, i, p)
    try:
        engine = nll_engine(model, ids[0].tolist())
    finally:
        for i in range(len(config)):
            staged.write_into(model.arena, i, Precision.FP16)
    return {"config": [p.value for p in config], "tokens": engine.tokens, "runner_nll": ours,
            "engine_nll": engine.total, "abs_diff_per_token": abs(ours - engine.total) / engine.tokens}


def statistics(a: argparse.Namespace, nll: dict[str, list[float]], tokens: list[int],
               configs: dict[str, Config]) -> dict[str, Any]:
    idx = bootstrap.draws(len(tokens), a.resamples, a.bootstrap_seed)
    ppl = {name: bootstrap.perplexity(v, tokens, idx).to_json() for name, v in nll.items()}
    paired: dict[str, Any] = {}
    for p in a.precision_list:
        for name in a.order_list:
            if name == REFERENCE:
                continue
            per_k = {}
            for k in a.k_list:
                r = bootstrap.paired_ratio(nll[f"{p.value}/{name}/k{k}"], nll[f"{p.value}/{REFERENCE}/k{k}"], tokens,
                                           idx)
                same = configs[f"{p.value}/{name}/k{k}"] == configs[f"{p.value}/{REFERENCE}/k{k}"]
                per_k[str(k)] = {**r.to_json(), "verdict": bootstrap.verdict(r), "same_layers": same}
            mean = bootstrap.paired_mean_ratio([(nll[f"{p.value}/{name}/k{k}"], nll[f"{p.value}/{REFERENCE}/k{k}"])
                                                for k in a.k_list], tokens, idx)
            counts = {v: sum(1 for x in per_k.values() if x["verdict"] == v) for v in ("better", "tie", "worse")}
            paired[f"{p.value}/{name}"] = {"per_k": per_k, "mean_over_k": {**mean.to_json(),
                                                                          "verdict": bootstrap.verdict(mean)},
                                           "lis_better_tie_worse": counts}
    return {"perplexity": ppl, "paired_vs_lis": paired, "resamples": a.resamples, "bootstrap_seed": a.bootstrap_seed,
            "level": 0.95}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    source = open_source(a.model)
    if source.synthetic:
        raise SystemExit(f"{a.model}: a perplexity study needs real weights (synthetic weights are random)")
    device, dtype = torch.device("cpu"), torch.float32
    model = LlamaModel(source, dtype, device)
    tok = source.tokenizer()
    from morphserve.quant.variants import open_w4_checkpoint

    w4 = "rtn" if a.w4 == "rtn" else open_w4_checkpoint(a.w4)
    staged = StagedVariants.build(model, w4, precisions=(Precision.FP16, *a.precision_list))
    runner = LayerRunner(model, staged)
    calib = calibration_windows(tok, a.calib_windows, a.calib_seq_len)
    heldout = document_windows(tok, a.eval_task, "eval", a.eval_docs, a.eval_seq_len)
    data = CalibrationData(runner, calib, a.search_windows)
    base_key = {"model": a.model, "w4": a.w4, "code": code_sha256(), "calibration": data.provenance()["tokens_sha256"],
                "search": data.provenance()["search_tokens_sha256"], "dtype": str(dtype)}

    t = time.perf_counter()
    orders = build_orders(a, runner, data, base_key)
    orders_s = time.perf_counter() - t
    if a.write_profiles:
        for p in a.precision_list:
            tag = w4_variant_tag(a.w4) if p == Precision.W4 else "rtn"
            doc = profile_document(orders[p.value][REFERENCE], model, staged, model_name=a.model, variant=tag)
            print(f"[order_study] profile {write_profile(doc, profile_path(a.model, p, variant=tag))}", file=sys.stderr)
    configs = study_configs(a, model.cfg.num_layers, orders)
    unique = distinct_configs(list(configs.values()))
    print(f"[order_study] {len(configs)} configurations, {len(unique)} distinct, {tree_nodes(unique)} prefix-tree "
          f"nodes x {heldout.num_windows * heldout.seq_len} tokens", file=sys.stderr)
    nll, eval_stats, eval_s = evaluate(a, runner, heldout, configs, base_key)
    tokens = [heldout.seq_len - 1] * heldout.num_windows
    mid_k = a.k_list[len(a.k_list) // 2]
    check = engine_check(model, staged, runner, heldout, configs[f"{a.precision_list[0].value}/{REFERENCE}/k{mid_k}"])

    result = {
        "provenance": provenance(config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                                         if k not in ("precision_list", "order_list", "k_list")},
                                 device=device, synthetic_weights=False),
        "model": {"name": a.model, "description": source.description, "num_layers": model.cfg.num_layers,
                  "compute_dtype": "float32", "variants": staged.metadata()["variants"]},
        "calibration": data.provenance(),
        "evaluation": {**heldout.provenance(), "scored_tokens": sum(tokens),
                       "scoring": "each window alone; every token after the first, given the tokens before it"},
        "orders": {p: {name: r.to_json() for name, r in by.items()} for p, by in orders.items()},
        "ks": a.k_list,
        "per_document_nll": nll,
        "tokens_per_document": tokens,
        "stats": statistics(a, nll, tokens, configs),
        "engine_check": check,
        "cost": {"orders_seconds": orders_s, "eval_seconds": eval_s, "eval_token_layers": eval_stats.token_layers,
                 "distinct_configs": len(unique), "prefix_tree_nodes": tree_nodes(unique),
                 "total_seconds": time.perf_counter() - t_start},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return result


# ---- report ------------------------------------------------------------------------------------------------------

def _ppl(x: dict[str, float]) -> str:
    return f"{x['value']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def _pct(x: dict[str, Any]) -> str:
    if x.get("same_layers"):
        return "= (same layers)"
    mark = {"better": " ▲", "worse": " ▼", "tie": ""}[x["verdict"]]
    return f"{100 * x['value']:+.2f}% [{100 * x['low']:+.2f}, {100 * x['high']:+.2f}]{mark}"


def markdown(r: dict[str, Any]) -> str:
    st, ev, cal = r["stats"], r["evaluation"], r["calibration"]
    ppl, paired = st["perplexity"], st["paired_vs_lis"]
    cfg = r["provenance"]["config"]
    orders = cfg["orders"].split(",")
    others = [o for o in orders if o != REFERENCE]
    lines = [
        f"## Swap orders on {r['model']['name']} ({r['model']['num_layers']} layers), CPU float32",
        "",
        f"Held-out: {ev['task']}/{ev['pool']}, the first {ev['seq_len']} tokens of each of its first "
        f"{ev['num_windows']} documents ({ev['scored_tokens']} scored tokens, sha256 {ev['tokens_sha256'][:12]}).  "
        f"Orders chosen on {cal['task']}/{cal['pool']} ({cal['num_windows']} x "
        f"{cal['seq_len']} tokens for LTS/LRS, first {cal['search_windows']} windows for the searches; sha256 "
        f"{cal['tokens_sha256'][:12]}).  95% bootstrap intervals over documents ({st['resamples']} resamples).  "
        f"FP16 perplexity {_ppl(ppl['fp16'])}.",
    ]
    for p in cfg["precisions"].split(","):
        variant = r["model"]["variants"][p]
        lines += ["", f"### {p.upper()} ({variant['method']}); all {r['model']['num_layers']} layers {p}: "
                      f"{_ppl(ppl[f'{p}/all'])}", "",
                  "| k | " + " | ".join(orders) + " |", "|---|" + "---|" * len(orders)]
        for k in r["ks"]:
            lines.append(f"| {k} | " + " | ".join(_ppl(ppl[f"{p}/{o}/k{k}"]) for o in orders) + " |")
        lines += ["", "Paired: perplexity of each order relative to LIS, `ppl(order) / ppl(LIS) - 1` "
                      "(▲ LIS better, ▼ LIS worse: the whole interval excludes 0; otherwise a tie; '=' the same "
                      "layers as LIS).", "",
                  "| k | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for k in r["ks"]:
            lines.append(f"| {k} | " + " | ".join(_pct(paired[f"{p}/{o}"]["per_k"][str(k)]) for o in others) + " |")
        lines.append("| mean over k | " + " | ".join(_pct(paired[f"{p}/{o}"]["mean_over_k"]) for o in others) + " |")
        lines.append("| LIS better / tie / worse | " + " | ".join(
            "{better} / {tie} / {worse}".format(**paired[f"{p}/{o}"]["lis_better_tie_worse"]) for o in others) + " |")
        lines += ["", "Orders (least important first):", ""]
        for o in orders:
            rec = r["orders"][p][o]
            lines.append(f"- {o}: {rec['order']} ({rec['seconds']:.0f} s, {rec['token_layers'] / 1e6:.2f} M "
                         f"token-layers on calibration windows)")
    ec, cost = r["engine_check"], r["cost"]
    swapped = [i for i, x in enumerate(ec["config"]) if x != "fp16"]
    lines += ["", f"Engine check (window 0, {ec['tokens']} tokens, layers {swapped} at {ec['config'][swapped[0]]}): "
                  f"|runner - engine| NLL per token {ec['abs_diff_per_token']:.2e}.  Cost: orders "
                  f"{cost['orders_seconds']:.0f} s, evaluation {cost['eval_seconds']:.0f} s "
                  f"({cost['distinct_configs']} distinct configurations, {cost['prefix_tree_nodes']} prefix-tree "
                  f"nodes)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

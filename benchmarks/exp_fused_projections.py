"""Experiment (issue #4, 2026-12-03): which folds of the elementwise kernels into the GEMVs pay at small batch.

Run on the GPU box: ``python3 benchmarks/exp_fused_projections.py --model llama2-7b --out fuse.json``.  Each variant
patches the decoder layer to fold a subset (SiLU-and-mul into ``down``; the post-attention residual add and norm
into ``o``'s epilogue and ``gate_up``'s prologue; the input residual add and norm into ``qkv``'s prologue) and
measures graph decode steps.
"""
import argparse, json, sys, time
import numpy as np, torch
sys.path.insert(0, "benchmarks")
import bench_fastpath as B
from morphserve.model.config import architecture
from morphserve.model.llama import LlamaModel
from morphserve.model.linear import linear

orig = LlamaModel.layer_forward

def make_forward(fold):
    def layer_forward(self, i, x, residual, state, pool, ks, out=None):
        eps = self.cfg.rms_norm_eps
        lw = self.arena.layers[i]
        if not fold or not ks.fuses_layer(lw, x.shape[0]):
            fs = ks.fuse_projections; ks.fuse_projections = False
            try:
                return orig(self, i, x, residual, state, pool, ks, out)
            finally:
                ks.fuse_projections = fs
        if "input" in fold:
            qkv = ks.norm_linear(x, residual, lw["input_norm"], eps, lw, "qkv")
        else:
            if residual is None:
                residual, h = x, ks.rms_norm(x, lw["input_norm"], eps)
            else:
                h, residual = ks.add_rms_norm(x, residual, lw["input_norm"], eps)
            qkv = linear(h, lw, "qkv")
        a = ks.attention(ks.rope_and_store(qkv, state, pool, lw.index), state, pool, lw.index)
        if "post" in fold:
            residual = ks.linear_add(a, lw, "o", x, residual) if "input" in fold else ks.linear_add(a, lw, "o", residual, None)
            gu = ks.norm_linear(residual, None, lw["post_norm"], eps, lw, "gate_up")
        else:
            h, residual = ks.add_rms_norm(linear(a, lw, "o"), residual, lw["post_norm"], eps)
            gu = linear(h, lw, "gate_up")
        y = ks.silu_linear(gu, lw, "down", out) if "silu" in fold else linear(ks.silu_and_mul(gu), lw, "down", out)
        return y, residual
    return layer_forward

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="llama2-7b"); ap.add_argument("--batches", default="1,2,4,8")
ap.add_argument("--reps", type=int, default=10); ap.add_argument("--out", required=True)
a = ap.parse_args()
dev = torch.device("cuda")
args = argparse.Namespace(prefill=[512], max_model_len=4096, kv_cache_bytes=8 << 30, async_steps="on")
res = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "model": a.model}
res["copy"] = B.copy_bandwidth(dev, 2 << 30, 10)
bw = res["copy"]["tb_per_s"] * 1e12
eng = B.build_engine(a.model, architecture(a.model), args, dev)
for seg in eng.pool.segments.values():
    seg.tensor.normal_()
rng = np.random.default_rng(0)
batches = [int(b) for b in a.batches.split(",")]
variants = [("none", ()), ("silu", ("silu",)), ("silu+post", ("silu", "post")), ("all", ("silu", "post", "input")),
            ("none(again)", ())]
res["variants"] = {}
for name, fold in variants:
    LlamaModel.layer_forward = make_forward(fold)
    eng.runner.graphs.clear()
    rows = B.decode_sweep(eng, batches, 512, a.reps, 3, bw, rng)
    res["variants"][name] = rows
    print(name, [(r["batch"], round(r["step_gpu_s"] * 1e3, 3), round(r["gpu_over_floor"], 3)) for r in rows], flush=True)
    if name == "all":
        res["profile_all_b1"] = B.profile_decode(eng, 1, 512, rng)
        for r in res["profile_all_b1"]["top"][:8]:
            print("   ", r["kernel"][:40], r["calls_per_step"], round(r["us_per_step"]), flush=True)
    json.dump(res, open(a.out, "w"), indent=1, default=str)

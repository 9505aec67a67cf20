"""Snakemake script: generate with the configured model and write outputs, timings and provenance as JSON."""

import json
import sys
import time

from morphserve import LLM, SamplingParams
from morphserve.provenance import provenance

sm = snakemake  # noqa: F821 (injected by Snakemake)
cfg = sm.params.cfg
sys.stderr = open(sm.log[0], "w")
llm = LLM(sm.wildcards.model, device=sm.config["device"], seed=sm.config["seed"])
params = SamplingParams(max_tokens=cfg["max_new_tokens"], temperature=0.0)
t0 = time.monotonic()
outputs = llm.generate(cfg["prompts"], params, chat=cfg.get("chat", False), use_tqdm=True)
wall = time.monotonic() - t0
n_out = sum(len(o.output_token_ids) for o in outputs)
result = {
    "model": sm.wildcards.model,
    "wall_seconds": wall,
    "output_tokens": n_out,
    "output_tokens_per_s": n_out / wall,
    "outputs": [o.to_dict() for o in outputs],
    "provenance": provenance(llm.engine.config.to_dict(), llm.engine.device, sm.config["seed"],
                             llm.engine.synthetic_weights),
}
with open(sm.output[0], "w") as f:
    json.dump(result, f, indent=2)

"""Snakemake script: a Markdown summary of the generation and parity results (every number read from files)."""

import json

sm = snakemake  # noqa: F821 (injected by Snakemake)
gen = json.load(open(sm.input.generate))
par = json.load(open(sm.input.parity))
prov = gen["provenance"]
lines = [
    f"# MorphServe run summary ({gen['model']})",
    "",
    f"- commit `{prov['git_commit']}`, device `{prov['device']}`, torch {prov['torch']}, created {prov['created']}",
    f"- synthetic weights: {prov.get('synthetic_weights')}",
    "",
    "## Generation",
    "",
    f"{len(gen['outputs'])} prompts, {gen['output_tokens']} output tokens in {gen['wall_seconds']:.2f} s "
    f"({gen['output_tokens_per_s']:.1f} tok/s, batched).",
    "",
    "| # | TTFT (s) | TPOT (ms) | tokens | finish | completion |",
    "|---|---|---|---|---|---|",
]
for i, o in enumerate(gen["outputs"]):
    m = o["metrics"]
    text = o["text"].replace("\n", " ").replace("|", "\\|")[:120]
    tpot = f"{m['tpot'] * 1e3:.1f}" if m["tpot"] is not None else "-"
    lines.append(f"| {i} | {m['ttft']:.3f} | {tpot} | {len(o['output_token_ids'])} | {o['finish_reason']} | {text} |")
lines += [
    "",
    "## Greedy parity with transformers.generate",
    "",
    f"{par['identical']}/{par['prompts']} prompts token-identical ({par['max_new_tokens']} new tokens, "
    f"batched together, dtype {par['dtype']}, {par['kv_blocks']} KV blocks).",
    "",
]
with open(sm.output[0], "w") as f:
    f.write("\n".join(lines))

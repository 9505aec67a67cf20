"""Snakemake script: the task quality of one run (morphserve.eval.quality: every request scored against its
references under every scheme, the headline scheme named).  Runs with synthetic weights produce meaningless text:
their quality file says so and holds no score."""

import sys

from morphserve.eval.quality import score_results_file, write_quality
from morphserve.harness.records import read_json

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
run, prov = read_json(sm.input.run, "run")
if run["synthetic_weights"]:
    write_quality(sm.output[0], {"not_measured": "synthetic weights: the generated text is meaningless",
                                 "tasks": {}}, prov)
else:
    _, quality = score_results_file(sm.input.requests, sm.output[0])
    for task, entry in quality["tasks"].items():
        print(f"{task}: {entry['headline_scheme']} {entry['headline_mean']} over {entry['scored']} requests",
              file=sys.stderr)

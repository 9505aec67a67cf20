# MorphServe reproducibility workflow. Run: snakemake --cores all   (or: make reproduce)
# Rules live in workflow/rules/*.smk, configuration in config/.
import sys

configfile: "config/config.yaml"

# The interpreter running Snakemake (the project's .venv under `make reproduce`) runs every step.
PYTHON = sys.executable

MODEL = config["model"]

include: "workflow/rules/generate.smk"

rule all:
    input:
        f"artifacts/generate_{MODEL}.json",
        f"artifacts/parity_{MODEL}.json",
        "artifacts/SUMMARY.md",

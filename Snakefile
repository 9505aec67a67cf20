# MorphServe reproducibility workflow (standard Snakemake layout: rules in workflow/rules/, scripts in
# workflow/scripts/, configuration in config/).
#
#   snakemake --cores all                                   # the embedded CPU default (= make reproduce)
#   snakemake --cores all --configfile config/paper.yaml    # the paper profile on a GPU machine
#   snakemake --profile workflow/profiles/slurm --configfile config/paper.yaml   # spread over a SLURM cluster
#
# prepare data -> calibrate the engine -> layer-importance order -> workloads -> one run per (setting, load,
# system) -> quality scores -> run summary -> tables, figures -> REPORT.md.  Results go to results/<profile>/,
# tables, figures and the report to the profile's `artifacts` folder.
import os
import sys
from pathlib import Path

# A profile file is complete: with --configfile, config/config.yaml is not loaded (Snakemake would merge nested
# mappings such as `models` and keep the CPU model in a paper run).
if "profile" not in config:

    configfile: "config/config.yaml"


# The offline data mirror beside the checkout, as the Makefile and the tests use it (downloads otherwise).
_MIRROR = Path(workflow.basedir).parent / "shared" / "data"
if not os.environ.get("MORPHSERVE_DATA_MIRROR") and _MIRROR.is_dir():
    os.environ["MORPHSERVE_DATA_MIRROR"] = str(_MIRROR)

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))
from artifact import grid  # noqa: E402

grid.validate(config)

# The interpreter running Snakemake (the project's .venv under `make reproduce`) runs every step.
PYTHON = sys.executable
R = f"results/{config['profile']}"
A = config["artifacts"]
RUNS = grid.all_runs(config)
BASE_LOAD = grid.base_load(config)
GPU = str(config["device"]).startswith("cuda")


wildcard_constraints:
    model=grid.NAME,
    budget=grid.NAME,
    trace=grid.NAME,
    system=grid.NAME,
    taskset=grid.TASKSET,
    load=grid.LOAD,


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/importance.smk"
include: "workflow/rules/workloads.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/generate.smk"


rule all:
    input:
        TABLES,
        FIGURES,
        f"{A}/REPORT.md",
        GENERATE_CHECKS,

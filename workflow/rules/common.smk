# Paths of the experiment grid (workflow/scripts/artifact/grid.py) and the lists of final outputs.


def run_dir(w):
    return grid.RunKey(w.model, w.budget, w.trace, w.taskset, w.load, w.system).run_dir(R)


RUN_DIR = R + "/runs/{model}/{budget}/{trace}/{taskset}/load{load}/{system}"
WORKLOAD = R + "/workloads/{model}/{budget}/{trace}/{taskset}/load{load}"
CALIBRATION = R + "/calibration/{model}/{budget}.json"
IMPORTANCE = R + "/importance/{model}.json"
SUMMARY_RUNS = f"{R}/summary/runs.csv"
SUMMARY_TASKS = f"{R}/summary/tasks.csv"

TABLE_NAMES = ("systems", "table5", "rate_sweep", "per_task")
TABLES = [f"{A}/tables/{name}.{ext}" for name in TABLE_NAMES for ext in ("csv", "md")]


def figure_paths():
    models = sorted({(s.model, s.budget) for s in grid.settings(config)})
    figs = [f"{A}/figures/fig4_ttft_vs_quality_{m}_{b}.png" for m, b in models]
    for s in grid.settings(config):
        figs.append(f"{A}/figures/fig5_kv_timeline_{s.slug}.png")
        figs.append(f"{A}/figures/fig7_tpot_cdf_{s.slug}.png")
    for s in grid.sweep_settings(config):
        figs.append(f"{A}/figures/fig6_ttft_vs_rate_{s.slug}.png")
    return figs


FIGURES = figure_paths()


def base_runs(w):
    """The run keys of one setting at the base load, in the configured system order."""
    setting = grid.Setting(w.model, w.budget, w.trace, w.taskset)
    return [r for s in config["systems"] for r in grid.runs_of(RUNS, setting, BASE_LOAD) if r.system == s]


def gpu_resources():
    return {"gpu": 1} if GPU else {}

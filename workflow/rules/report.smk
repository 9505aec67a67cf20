# REPORT.md: the paper's headline claims next to the measured values, with the hardware and configuration.
# Figures are linked, not inputs: deleting a figure rebuilds that figure only.


rule report:
    input:
        runs=SUMMARY_RUNS,
        tasks=SUMMARY_TASKS,
        claims="config/claims.yaml",
        tables=TABLES,
        calibrations=sorted({f"{R}/calibration/{s.model}/{s.budget}.json" for s in grid.settings(config)}),
        importances=sorted({f"{R}/importance/{s.model}.json" for s in grid.settings(config)}),
        workloads=[grid.workload_path(R, s, load).removesuffix(".jsonl") + ".summary.json"
                   for s, load in grid.workloads(config)],
    output:
        report=f"{A}/REPORT.md",
        claims=f"{A}/claims.json",
    params:
        figures=FIGURES,
    log:
        f"logs/{config['profile']}/report.log",
    script:
        "../scripts/report.py"

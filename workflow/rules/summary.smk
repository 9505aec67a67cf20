# One row per run and per (run, task), from every run's files.


rule collect:
    input:
        [f"{r.run_dir(R)}/{name}" for r in RUNS for name in
         ("aggregates.json", "quality.json", "requests.json", "timeline.csv", "run.json")],
        [r.workload(R).removesuffix(".jsonl") + ".summary.json" for r in RUNS],
    output:
        runs=SUMMARY_RUNS,
        tasks=SUMMARY_TASKS,
    params:
        runs=[(r.model, r.budget, r.trace, r.taskset, r.load, r.system) for r in RUNS],
        run_dirs=[r.run_dir(R) for r in RUNS],
        workload_summaries=[r.workload(R).removesuffix(".jsonl") + ".summary.json" for r in RUNS],
    log:
        f"logs/{config['profile']}/collect.log",
    script:
        "../scripts/collect.py"

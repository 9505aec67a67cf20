# One run: a system serving a workload in real time (all cores: nothing else runs beside a timed replay), then
# its quality.


rule run:
    input:
        workload=WORKLOAD + ".jsonl",
        summary=WORKLOAD + ".summary.json",
        calibration=CALIBRATION,
        importance=IMPORTANCE,
    output:
        requests=RUN_DIR + "/requests.json",
        requests_csv=RUN_DIR + "/requests.csv",
        aggregates=ensure(RUN_DIR + "/aggregates.json", non_empty=True),
        timeline=RUN_DIR + "/timeline.csv",
        morph_timeline=RUN_DIR + "/morph_timeline.csv",
        run=RUN_DIR + "/run.json",
    log:
        f"logs/{config['profile']}/runs/{{model}}_{{budget}}_{{trace}}_{{taskset}}_load{{load}}_{{system}}.log",
    threads: workflow.cores
    resources:
        runtime=60,
        **gpu_resources(),
    script:
        "../scripts/run_system.py"


rule score:
    input:
        requests=RUN_DIR + "/requests.json",
        run=RUN_DIR + "/run.json",
    output:
        ensure(RUN_DIR + "/quality.json", non_empty=True),
    log:
        f"logs/{config['profile']}/score/{{model}}_{{budget}}_{{trace}}_{{taskset}}_load{{load}}_{{system}}.log",
    script:
        "../scripts/score_run.py"

# A trace window paired with task inputs, rate-scaled to the calibrated capacity x the load factor.


rule workload:
    input:
        calibration=CALIBRATION,
    output:
        jsonl=ensure(WORKLOAD + ".jsonl", non_empty=True),
        summary=WORKLOAD + ".summary.json",
    log:
        f"logs/{config['profile']}/workloads/{{model}}_{{budget}}_{{trace}}_{{taskset}}_load{{load}}.log",
    script:
        "../scripts/build_workload.py"

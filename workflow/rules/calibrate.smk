# Measure FP16's capacity and unloaded latency on the hardware at hand; the offered loads and SLOs derive from it.


rule calibrate:
    input:
        data=f"{R}/data/inputs.json",
    output:
        ensure(CALIBRATION, non_empty=True),
    log:
        f"logs/{config['profile']}/calibrate/{{model}}_{{budget}}.log",
    threads: workflow.cores
    resources:
        runtime=30,
        **gpu_resources(),
    script:
        "../scripts/calibrate.py"

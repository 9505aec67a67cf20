# The swap order (least important layer first) of each model, from morphserve.importance's LIS profile.


rule importance:
    input:
        data=f"{R}/data/inputs.json",
    output:
        ensure(IMPORTANCE, non_empty=True),
    log:
        f"logs/{config['profile']}/importance/{{model}}.log",
    threads: workflow.cores
    resources:
        runtime=60,
        **gpu_resources(),
    script:
        "../scripts/profile_importance.py"

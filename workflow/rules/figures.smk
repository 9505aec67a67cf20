# One job per figure file, so that deleting a figure rebuilds that figure only.


rule fig_ttft_quality:
    input:
        runs=SUMMARY_RUNS,
        tasks=SUMMARY_TASKS,
    output:
        f"{A}/figures/fig4_ttft_vs_quality_{{model}}_{{budget}}.png",
    log:
        f"logs/{config['profile']}/figures/fig4_{{model}}_{{budget}}.log",
    script:
        "../scripts/fig_ttft_quality.py"


rule fig_kv_timeline:
    input:
        runs=SUMMARY_RUNS,
        timelines=lambda w: [r.run_dir(R) + "/timeline.csv" for r in base_runs(w)],
    output:
        f"{A}/figures/fig5_kv_timeline_{{model}}_{{budget}}_{{trace}}_{{taskset}}.png",
    params:
        systems=lambda w: [r.system for r in base_runs(w)],
        load=BASE_LOAD,
    log:
        f"logs/{config['profile']}/figures/fig5_{{model}}_{{budget}}_{{trace}}_{{taskset}}.log",
    script:
        "../scripts/fig_kv_timeline.py"


rule fig_ttft_vs_rate:
    input:
        runs=SUMMARY_RUNS,
    output:
        f"{A}/figures/fig6_ttft_vs_rate_{{model}}_{{budget}}_{{trace}}_{{taskset}}.png",
    log:
        f"logs/{config['profile']}/figures/fig6_{{model}}_{{budget}}_{{trace}}_{{taskset}}.log",
    script:
        "../scripts/fig_ttft_vs_rate.py"


rule fig_tpot_cdf:
    input:
        runs=SUMMARY_RUNS,
        requests=lambda w: [r.run_dir(R) + "/requests.csv" for r in base_runs(w)],
    output:
        f"{A}/figures/fig7_tpot_cdf_{{model}}_{{budget}}_{{trace}}_{{taskset}}.png",
    params:
        systems=lambda w: [r.system for r in base_runs(w)],
        load=BASE_LOAD,
    log:
        f"logs/{config['profile']}/figures/fig7_{{model}}_{{budget}}_{{trace}}_{{taskset}}.log",
    script:
        "../scripts/fig_tpot_cdf.py"

# The artifact's tables, CSV and Markdown.


rule tables:
    input:
        runs=SUMMARY_RUNS,
        tasks=SUMMARY_TASKS,
    output:
        **{f"{name}_{ext}": f"{A}/tables/{name}.{ext}" for name in TABLE_NAMES for ext in ("csv", "md")},
    log:
        f"logs/{config['profile']}/tables.log",
    script:
        "../scripts/make_tables.py"

# The foundation's checks, kept in the default profile: generation with the embedded model and greedy parity
# against transformers (profiles without a `generate` key skip them).

GENERATE_CHECKS = (
    [f"artifacts/generate_{config['model']}.json", f"artifacts/parity_{config['model']}.json",
     "artifacts/SUMMARY.md"]
    if "generate" in config
    else []
)


rule generate:
    output:
        "artifacts/generate_{model}.json",
    log:
        "logs/generate_{model}.log",
    params:
        cfg=lambda wc: config["generate"],
    threads: workflow.cores
    script:
        "../scripts/generate.py"


rule parity:
    output:
        "artifacts/parity_{model}.json",
    log:
        "logs/parity_{model}.log",
    params:
        prompts=config.get("parity", {}).get("prompts"),
        max_new_tokens=config.get("parity", {}).get("max_new_tokens"),
        device=config["device"],
    threads: workflow.cores
    shell:
        "{PYTHON} -m morphserve parity --model {wildcards.model} --device {params.device} --prompts {params.prompts} "
        "--max-new-tokens {params.max_new_tokens} --output {output} > {log} 2>&1"


rule summary:
    input:
        generate=f"artifacts/generate_{config.get('model')}.json",
        parity=f"artifacts/parity_{config.get('model')}.json",
    output:
        "artifacts/SUMMARY.md",
    script:
        "../scripts/summary.py"

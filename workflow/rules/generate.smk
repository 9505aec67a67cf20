# Generation with the embedded default model and greedy parity against transformers.

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
        prompts=config["parity"]["prompts"],
        max_new_tokens=config["parity"]["max_new_tokens"],
        device=config["device"],
    threads: workflow.cores
    shell:
        "{PYTHON} -m morphserve parity --model {wildcards.model} --device {params.device} --prompts {params.prompts} "
        "--max-new-tokens {params.max_new_tokens} --output {output} > {log} 2>&1"


rule summary:
    input:
        generate=f"artifacts/generate_{MODEL}.json",
        parity=f"artifacts/parity_{MODEL}.json",
    output:
        "artifacts/SUMMARY.md",
    script:
        "../scripts/summary.py"

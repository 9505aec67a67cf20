# Every external input (traces, task files, model weights and tokenizers), resolved and checksum-verified once.


rule prepare_data:
    output:
        ensure(f"{R}/data/inputs.json", non_empty=True),
    log:
        f"logs/{config['profile']}/prepare_data.log",
    script:
        "../scripts/prepare_data.py"

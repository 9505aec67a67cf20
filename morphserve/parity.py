"""Token-level parity between this engine and transformers' ``generate`` (greedy decoding).

The engine runs all prompts *batched together* (mixed lengths, continuous batching, paged KV); transformers runs
each prompt on its own with its dynamic cache, so no padding enters the reference.  A prompt counts as identical
when the two token sequences are equal; for a mismatch the first divergent position is reported.
"""

from __future__ import annotations

from typing import Any

import torch

from morphserve.engine.engine import LLMEngine
from morphserve.engine.sampling_params import SamplingParams

# Mixed lengths on purpose (a few tokens to a few hundred), so a batch holds prefill chunks of different sizes.
PARITY_PROMPTS = [
    "The capital of Italy is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker who",
    "List three prime numbers greater than 100:",
    "Translate to French: The weather is nice today.",
    "The theory of general relativity, published by Albert Einstein in 1915, describes gravity as the curvature of "
    "spacetime caused by mass and energy. Among its predictions are the bending of light by massive objects, the "
    "precession of Mercury's orbit, gravitational time dilation and gravitational waves, which were first detected "
    "directly in 2015 by the LIGO observatories. In simple words, the main idea of general relativity is that",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
    "import numpy as np\n\ndef normalize(x):\n    \"\"\"Scale x to zero mean and unit variance.\"\"\"\n",
    "A recipe for pancakes needs flour, eggs, milk and",
    "The three laws of thermodynamics are",
    "In a distributed system, consensus protocols such as Raft and Paxos ensure that",
]


def reference_model(engine: LLMEngine) -> Any:
    """The transformers model for the engine's checkpoint, same dtype, same device."""
    from transformers import AutoModelForCausalLM

    path = getattr(engine.source, "path", None)
    if path is None:
        raise ValueError(f"parity needs a real checkpoint; {engine.model_config.name!r} has synthetic weights")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=engine.dtype).to(engine.device)
    return model.eval()


@torch.no_grad()
def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...]) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=list(eos_ids), pad_token_id=eos_ids[0])
    gen = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(gen):  # generate pads finished rows; cut after the first eos like the engine does
        if t in eos_ids:
            return gen[:i + 1]
    return gen


def run_parity(engine: LLMEngine, prompts: list[str], max_new_tokens: int, hf_model: Any = None) -> dict[str, Any]:
    hf_model = hf_model if hf_model is not None else reference_model(engine)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    ids = {engine.add_request(p, params): p for p in prompts}
    outputs = {o.request_id: o for o in engine.run_until_done()}
    results = []
    for rid, prompt in ids.items():
        out = outputs[rid]
        ref = hf_greedy(hf_model, out.prompt_token_ids, max_new_tokens, engine.model_config.eos_token_ids)
        mine = out.output_token_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b),
                          None if len(mine) == len(ref) else min(len(mine), len(ref)))
        results.append({"prompt_tokens": len(out.prompt_token_ids), "identical": mine == ref,
                        "first_divergence": first_diff, "engine_tokens": len(mine), "reference_tokens": len(ref),
                        "engine_text": out.text, "num_preemptions": out.metrics.num_preemptions})
    return {
        "model": engine.model_config.name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "prompts": len(results),
        "identical": sum(r["identical"] for r in results),
        "max_new_tokens": max_new_tokens,
        "kv_blocks": engine.block_manager.num_total_blocks,
        "preemptions": engine.scheduler.num_preemptions,
        "results": results,
    }

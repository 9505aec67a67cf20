"""``morphserve`` command line: ``generate``, ``parity``, ``workload``, ``replay``, ``score`` and ``profile``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from morphserve.data.mirror import DataError
from morphserve.engine.config import EngineConfig
from morphserve.model.config import ModelError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (real weights), vicuna-7b/llama2-7b/llama3-8b/codellama-34b (synthetic), "
                        "or a Hugging Face checkpoint directory")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks of 16 tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="per-step token budget")
    p.add_argument("--seed", type=int, default=0)


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=a.model, device=a.device, dtype=a.dtype, num_kv_blocks=a.num_kv_blocks,
                        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, seed=a.seed)


def cmd_generate(a: argparse.Namespace) -> int:
    from morphserve.engine.llm import LLM
    from morphserve.engine.sampling_params import SamplingParams
    from morphserve.provenance import provenance

    cfg = _engine_config(a)
    params = SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            seed=a.seed if a.temperature > 0 else None, ignore_eos=a.ignore_eos)
    llm = LLM(**cfg.to_dict())
    out = llm.generate(a.prompt, params, chat=a.chat, use_tqdm=False)
    if llm.engine.synthetic_weights:
        print("[morphserve] SYNTHETIC WEIGHTS: this text is meaningless (performance runs only)", file=sys.stderr)
    if a.json:
        print(json.dumps({"outputs": [o.to_dict() for o in out],
                          "provenance": provenance(cfg.to_dict(), llm.engine.device, a.seed,
                                                   llm.engine.synthetic_weights)}, indent=2))
    else:
        for o in out:
            print(o.text)
    return 0


def cmd_parity(a: argparse.Namespace) -> int:
    from morphserve.engine.engine import LLMEngine
    from morphserve.parity import PARITY_PROMPTS, run_parity
    from morphserve.provenance import provenance

    if not 1 <= a.prompts <= len(PARITY_PROMPTS):
        raise ValueError(f"--prompts must be in [1, {len(PARITY_PROMPTS)}], got {a.prompts}")
    cfg = _engine_config(a)
    engine = LLMEngine(cfg)
    summary = run_parity(engine, PARITY_PROMPTS[:a.prompts], a.max_new_tokens)
    summary["provenance"] = provenance(cfg.to_dict(), engine.device, a.seed, engine.synthetic_weights)
    text = json.dumps(summary, indent=2)
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    return 0 if summary["identical"] == summary["prompts"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="morphserve", description="MorphServe LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion")
    _engine_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print outputs, timestamps and provenance as JSON")
    g.set_defaults(fn=cmd_generate)
    p = sub.add_parser("parity", help="greedy token parity against transformers.generate")
    _engine_args(p)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", help="also write the JSON summary to this file")
    p.set_defaults(fn=cmd_parity)
    from morphserve.harness.cli import add_parsers as add_harness_parsers
    from morphserve.importance.cli import add_parsers as add_importance_parsers

    add_harness_parsers(sub)  # workload, replay, score
    add_importance_parsers(sub)  # profile
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, ModelError, OSError, DataError) as e:
        print(f"morphserve {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The engine as an lm-evaluation-harness model named ``morphserve``.

Importing this module registers :class:`MorphServeLM` with lm-eval (``lm_eval.api.registry``).  The ``lm_eval``
command does not import third-party modules, so run lm-eval through this module, which registers the model and then
hands its arguments to lm-eval's own command line unchanged::

    MORPHSERVE_WORKLOAD=artifacts/w.jsonl python -m morphserve.eval.lm_eval_model run --model morphserve \\
        --model_args model=smollm2-135m --tasks morphserve_qmsum --include_path morphserve/eval/lm_eval_tasks \\
        --device cpu

lm-eval's command line passes ``--device`` to the model and defaults it to ``cuda:0``; the engine takes it as
asked, so on a machine without CUDA pass ``--device cpu`` (a CUDA device that does not exist raises).

(Python callers use ``lm_eval.simple_evaluate(model=MorphServeLM(...), ...)`` after importing this module.)

Generation (``generate_until``): all requests of a call are handed to :class:`morphserve.engine.llm.LLM` at once
(``batch_size``: at most that many at a time), so the engine batches them continuously; decoding is greedy unless the
task asks for ``temperature > 0``.  A document that carries ``max_tokens`` and ``ignore_eos`` (the records of a
workload file do: see ``morphserve/eval/lm_eval_tasks``) is generated with exactly those limits, so lm-eval produces
the outputs a replay of that workload produces; otherwise ``max_gen_toks`` (default 256) applies.  ``until`` strings
are applied to the decoded text: it is cut before the first occurrence of any of them (the engine stops on token
ids only, so it may generate past a stop string; the cut text is what lm-eval scores).

Recorded outputs: with ``results=<requests.json of a replay>`` the model generates nothing and answers each
workload document with the output that replay recorded for its ``request_id``.  lm-eval then scores exactly what
the engine served under load (with whatever layer precisions it had at the time).  A document whose request ended in
an error record has no output, and asking for it raises.

Log-likelihood requests are not supported: the engine returns sampled tokens, not the log-probabilities of given
continuations, so tasks that need them (multiple choice, perplexity) raise :class:`NotSupportedError`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

MODEL_NAME = "morphserve"
DEFAULT_MAX_GEN_TOKS = 256
_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


class NotSupportedError(NotImplementedError):
    """An lm-eval request type the engine cannot answer."""


def _int_arg(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"morphserve model argument {name}={value!r} must be an integer >= {minimum}")
    return value


class MorphServeLM(LM):
    """``--model_args``: ``model`` (a model name or checkpoint directory, default smollm2-135m), ``device``,
    ``dtype``, ``num_kv_blocks``, ``max_num_seqs``, ``max_num_batched_tokens``, ``seed`` (as for the engine), and
    ``results`` (the ``requests.json`` of a replay, to score its recorded outputs instead of generating).
    ``batch_size`` (lm-eval's ``--batch_size``): requests handed to the engine at a time (``auto``/unset: all);
    lm-eval's ``max_batch_size`` is accepted and unused (the engine's own ``max_num_seqs`` bounds a batch).
    ``llm``: an already built :class:`morphserve.engine.llm.LLM` to use instead of building one (Python callers)."""

    def __init__(self, model: str = "smollm2-135m", device: str | None = None, dtype: str | None = None,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 seed: int = 0, results: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, llm: Any = None) -> None:
        super().__init__()
        self.batch_size = None if batch_size in (None, "auto") else _int_arg("batch_size", int(batch_size))
        self.results_path = Path(results) if results is not None else None
        self.recorded: dict[str, Any] | None = None
        self.llm = llm
        self.model_name = str(model)
        if self.results_path is not None:
            if llm is not None:
                raise ValueError("pass either results= (recorded outputs) or an engine, not both")
            from morphserve.harness.records import read_request_records

            records, _ = read_request_records(self.results_path)
            self.recorded = {r.request_id: r for r in records}
            self.tokenizer = None
        else:
            if llm is None:
                from morphserve.engine.llm import LLM

                options: dict[str, Any] = {"device": device, "dtype": dtype, "max_num_seqs": max_num_seqs,
                                           "max_num_batched_tokens": max_num_batched_tokens, "seed": seed}
                if num_kv_blocks is not None:
                    options["num_kv_blocks"] = _int_arg("num_kv_blocks", num_kv_blocks)
                self.llm = LLM(self.model_name, **options)
            self.tokenizer = self.llm.tokenizer
            self._device = self.llm.engine.device

    # ---- generation ------------------------------------------------------------------------------------------
    def _params(self, inst: Instance) -> tuple[Any, list[str]]:
        from morphserve.engine.sampling_params import SamplingParams

        gen_kwargs = dict(inst.args[1]) if len(inst.args) > 1 and inst.args[1] else {}
        unknown = sorted(set(gen_kwargs) - _GEN_KWARGS)
        if unknown:
            raise ValueError(f"{inst.task_name} doc {inst.doc_id}: generation kwargs {unknown} are not supported by "
                             f"the morphserve model (supported: {sorted(_GEN_KWARGS)})")
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        doc = inst.doc if isinstance(inst.doc, dict) else {}
        max_tokens = doc.get("max_tokens", gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", True) else 0.0
        params = SamplingParams(max_tokens=int(max_tokens), ignore_eos=bool(doc.get("ignore_eos", False)),
                                temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)),
                                top_k=int(gen_kwargs.get("top_k", 0)))
        return params, list(until)

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        cuts = [text.find(s) for s in until if s]
        cuts = [c for c in cuts if c >= 0]
        return text[:min(cuts)] if cuts else text

    def _recorded_output(self, inst: Instance) -> str:
        assert self.recorded is not None
        rid = inst.doc.get("request_id") if isinstance(inst.doc, dict) else None
        if rid is None:
            raise ValueError(f"{inst.task_name} doc {inst.doc_id} has no request_id: results= answers only the "
                             f"documents of a workload file")
        rec = self.recorded.get(rid)
        if rec is None:
            raise ValueError(f"request {rid!r} is not in {self.results_path}")
        if not rec.ok or rec.text is None:
            raise ValueError(f"request {rid!r} ended in an error record in {self.results_path} "
                             f"({rec.error_kind}: {rec.error}); it has no output to score")
        return rec.text

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        prepared = [(inst.args[0], *self._params(inst)) for inst in requests]
        if self.recorded is not None:
            texts = [self._recorded_output(inst) for inst in requests]
        else:
            texts = []
            step = self.batch_size or len(prepared)
            with tqdm(total=len(prepared), desc="morphserve generate_until", disable=disable_tqdm) as bar:
                for lo in range(0, len(prepared), step):
                    chunk = prepared[lo:lo + step]
                    outs = self.llm.generate([c[0] for c in chunk], [c[1] for c in chunk], use_tqdm=False)
                    texts += [o.text or "" for o in outs]
                    bar.update(len(chunk))
        out = []
        for (context, params, until), text in zip(prepared, texts):
            text = self._cut(text, until)
            self.cache_hook.add_partial("generate_until", (context, {"until": until,
                                                                     "max_gen_toks": params.max_tokens}), text)
            out.append(text)
        return out

    # ---- what the engine cannot do ---------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        raise NotSupportedError("the morphserve lm-eval model supports generate_until only: the engine returns "
                                "generated tokens, not log-likelihoods of given continuations (use generation "
                                "tasks such as morphserve_qmsum)")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotSupportedError("the morphserve lm-eval model does not compute rolling log-likelihoods (perplexity); "
                                "use morphserve.eval.perplexity")

    # ---- chat templates --------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.model_name.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise NotSupportedError(f"model {self.model_name!r} has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        if self.recorded is not None:
            return {"morphserve_results": str(self.results_path)}
        engine = self.llm.engine
        return {"morphserve_model": self.model_name, "morphserve_engine_config": engine.config.to_dict(),
                "morphserve_synthetic_weights": engine.synthetic_weights}


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``morphserve`` model registered."""
    import importlib

    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("morphserve.eval.lm_eval_model")  # registers the model (also when run as __main__)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


# Register once, from the importable module (not from a copy run as ``__main__``: main() imports the real one).
if __name__ != "__main__":
    register_model(MODEL_NAME)(MorphServeLM)

if __name__ == "__main__":
    main()

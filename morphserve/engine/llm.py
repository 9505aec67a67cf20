"""The offline API: ``LLM(model).generate(prompts, params)`` (the shape of vLLM's and nano-vllm's)."""

from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine, RequestError
from morphserve.engine.request import RequestOutput
from morphserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", **engine_options: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def apply_chat_template(self, prompt: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"model {self.engine.model_config.name!r} has no chat template")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, prompts: Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.  All prompts are validated before any
        is queued: a bad one raises RequestError naming its index and the bad value."""
        if isinstance(prompts, (str, bytes)):
            raise RequestError("prompts must be a list; wrap a single prompt in [...]")
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise RequestError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        if chat:
            prompts = [self.apply_chat_template(p) if isinstance(p, str) else p for p in prompts]
        token_ids = []
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            try:
                token_ids.append(self.engine.validate(p, sp))
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}") from None
        ids = [self.engine.add_request(t, sp) for t, sp in zip(token_ids, params_list)]
        for rid, p in zip(ids, prompts):
            if isinstance(p, str):
                self.engine.requests[rid].prompt = p
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    done[out.request_id] = out
                    bar.update(1)
        return [done[i] for i in ids]

"""LongBench prompts for the four quality tasks, cut to a token budget by LongBench's middle truncation.

Templates.  :data:`LONGBENCH_TEMPLATES` are LongBench's ``dataset2prompt`` entries for the four tasks (THUDM/LongBench,
``config/dataset2prompt.json`` @ 8ae23fd444b0ed5837e993fb8d764f70b388c568): gov_report, qmsum and multi_news in
English, dureader in Chinese.  The MiniLongBench prompts of the data mirror were produced by OpenCompass's LongBench
configs, whose multi_news template ends ``"Summary:\\n"`` where LongBench's ends ``"Summary:"``
(open-compass/opencompass ``configs/datasets/longbench/longbenchmulti_news/longbench_multi_news_gen_6f9da9.py``); the
other three are identical.  :data:`OPENCOMPASS_TEMPLATES` carries that variant: with it, every one of the 35
MiniLongBench prompts is reproduced byte for byte from its context and input.  Prompts are built with LongBench's
own templates by default.

Truncation.  :func:`build_prompt` follows LongBench's ``pred.py``: when the prompt is too long, keep the first and the
last tokens of the budget, decode both halves (``skip_special_tokens=True``) and join the two strings.  The cut text
is then re-tokenized by whoever serves it, so the result is re-counted, and in the rare case where re-tokenization at
the junction (or a byte-level token cut inside a UTF-8 character, which decodes to U+FFFD) makes it longer than the
budget, the kept tokens are reduced until it fits.  The budget is an exact bound on what the engine sees.

Budget accounting.  ``max_prompt_tokens`` counts every token the engine will be given for the returned text, that is
``len(tokenizer(text)["input_ids"])`` - the same call as :meth:`morphserve.engine.engine.LLMEngine.tokenize` - so it
includes the special tokens the tokenizer adds (BOS for Llama-2 and Llama-3; SmolLM2's tokenizer adds none) and,
with ``chat=True``, the whole chat template.  The text budget is ``max_prompt_tokens`` minus that overhead (the token
count of an empty prompt, wrapped the same way); its first half (rounded down) is kept from the head and the rest from
the tail.  With one BOS and a budget of 512 this keeps 255 head and 256 tail tokens, which is exactly what LongBench's
``tokens[:256] + tokens[-256:]`` keeps (its first token is the BOS, dropped by the decode).  As in LongBench, the chat
template is applied after truncation, so the instructions at both ends of the LongBench prompt survive.

Lengths.  The paper fixes the prompt and response lengths by attention type: 512 / 256 tokens for the MHA models
(Vicuna-7B, Llama-2-7B), 1024 / 512 for the GQA models (Llama-3-8B, CodeLlama-34B); :func:`prompt_length_for` and
:func:`response_length_for` return them for a :class:`~morphserve.model.config.ModelConfig`.  Prompts shorter than
the budget are returned as they are (never padded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from string import Formatter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from morphserve.model.config import ModelConfig
    from morphserve.workloads.tasks import TaskExample

LONGBENCH_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                  "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
             "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
})

OPENCOMPASS_TEMPLATES: Mapping[str, str] = MappingProxyType({
    **LONGBENCH_TEMPLATES,
    "multi_news": LONGBENCH_TEMPLATES["multi_news"] + "\n",
})

# The paper's fixed request lengths by attention type: (prompt tokens, response tokens).
PAPER_LENGTHS: Mapping[str, tuple[int, int]] = MappingProxyType({"MHA": (512, 256), "GQA": (1024, 512)})


def _template(task: str, templates: Mapping[str, str]) -> str:
    try:
        return templates[task]
    except KeyError:
        raise ValueError(f"no prompt template for task {task!r}; templates exist for {', '.join(templates)}") from None


def format_prompt(example: TaskExample, templates: Mapping[str, str] = LONGBENCH_TEMPLATES) -> str:
    """The full, untruncated prompt of ``example`` (LongBench's ``prompt_format.format(**record)``)."""
    return _template(example.task, templates).format(context=example.context, input=example.input)


def parse_prompt(task: str, prompt: str, templates: Mapping[str, str] = LONGBENCH_TEMPLATES) -> tuple[str, str]:
    """Invert :func:`format_prompt`: the (context, input) that the task's template turns into ``prompt``.

    The input is taken after the *last* occurrence of the text between ``{context}`` and ``{input}``.  Raises
    ValueError, naming the part that differs, when ``prompt`` was not made with this template.
    """
    template = _template(task, templates)
    parts = list(Formatter().parse(template))
    fields = [name for _, name, _, _ in parts if name is not None]
    literals = [literal for literal, _, _, _ in parts]
    if fields not in (["context"], ["context", "input"]):
        raise ValueError(f"template of {task!r} has fields {fields}; expected context, then optionally input")
    prefix = literals[0]
    suffix = literals[-1] if len(literals) > len(fields) else ""
    if not prompt.startswith(prefix):
        raise ValueError(f"{task} prompt does not start with the template's {prefix[:60]!r}...")
    if not prompt.endswith(suffix) or len(prompt) < len(prefix) + len(suffix):
        raise ValueError(f"{task} prompt does not end with the template's ...{suffix[-60:]!r}")
    body = prompt[len(prefix):len(prompt) - len(suffix)]
    query = ""
    if len(fields) == 2:
        middle = literals[1]
        cut = body.rfind(middle)
        if cut < 0:
            raise ValueError(f"{task} prompt lacks the template's text between context and input: {middle!r}")
        body, query = body[:cut], body[cut + len(middle):]
    if template.format(context=body, input=query) != prompt:
        raise ValueError(f"{task} prompt is not reproduced by its template from the parsed context and input")
    return body, query


def _chat_wrapper(tokenizer: Any) -> Callable[[str], str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat=True but the tokenizer {type(tokenizer).__name__} has no chat template")

    def wrap(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return wrap


def build_prompt(example: TaskExample, tokenizer: Any, max_prompt_tokens: int, *, chat: bool = False,
                 templates: Mapping[str, str] = LONGBENCH_TEMPLATES) -> tuple[str, int]:
    """The prompt text for ``example`` cut to at most ``max_prompt_tokens`` tokens, and its exact token count.

    ``tokenizer`` is a transformers tokenizer (the engine's).  The count is ``len(tokenizer(text)["input_ids"])`` of
    the returned text, special tokens included (see the module docstring for the budget accounting).  With
    ``chat=True`` the returned text is already wrapped in the tokenizer's chat template.  Raises ValueError when the
    budget cannot hold the special tokens and chat template plus two tokens of text.
    """
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
    wrap = _chat_wrapper(tokenizer) if chat else (lambda text: text)

    def count(text: str) -> int:
        return len(tokenizer(wrap(text), verbose=False)["input_ids"])

    prompt = format_prompt(example, templates)
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= max_prompt_tokens:
        n = count(prompt)
        if n <= max_prompt_tokens:
            return wrap(prompt), n

    overhead = count("")
    budget = min(max_prompt_tokens - overhead, len(ids))
    if budget < 2:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves {budget} tokens of text after "
                         f"{overhead} special/chat-template tokens; need at least 2")
    while budget >= 2:
        head = budget // 2
        tail = budget - head
        text = (tokenizer.decode(ids[:head], skip_special_tokens=True)
                + tokenizer.decode(ids[len(ids) - tail:], skip_special_tokens=True))
        n = count(text)
        if n <= max_prompt_tokens:
            return wrap(text), n
        budget -= n - max_prompt_tokens
    raise ValueError(f"{example.id}: cannot cut the prompt to {max_prompt_tokens} tokens with this tokenizer")


def prompt_length_for(model_config: ModelConfig) -> int:
    """The paper's fixed prompt length for ``model_config``: 512 tokens for MHA models, 1024 for GQA models."""
    return PAPER_LENGTHS[model_config.attention][0]


def response_length_for(model_config: ModelConfig) -> int:
    """The paper's fixed response length for ``model_config``: 256 tokens for MHA models, 512 for GQA models."""
    return PAPER_LENGTHS[model_config.attention][1]

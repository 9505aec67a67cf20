"""Teacher-forced perplexity on held-out text, through transformers or through the engine's own forward.

Text: LongBench Multi-News documents from the data mirror (``multi_news``, 200 examples).  The evaluation subset is
fixed and documented: the ``context`` of examples ``first_doc, first_doc + 1, ...`` in file order, with LongBench's
literal ``NEWLINE_CHAR`` markers turned back into newlines, tokenized document by document without special tokens,
joined with the model's EOS token, and cut into consecutive non-overlapping windows of ``seq_len`` tokens until
``num_windows`` are filled.  In each window every token after the first is scored given the tokens before it in
the window (``seq_len - 1`` predictions per window).  The sha256 of the token windows is recorded.

Two evaluators, which must agree:

* :func:`nll_hf` runs a transformers ``LlamaForCausalLM``; a quantized variant is evaluated by writing its
  dequantized weights into a copy of the model (:func:`load_layer_weights`), which is exactly what the reference
  kernels compute (dequantize, then a dense GEMM).
* :func:`nll_engine` runs :class:`morphserve.model.llama.LlamaModel` (arena, paged KV pool, the registered linear
  kernel of each layer's current precision) on one window as a single prefill.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from morphserve.model.llama import LlamaModel

EVAL_FILE_ID = "multi_news"


@dataclass(frozen=True)
class EvalText:
    """Token windows of held-out text, with their provenance."""

    windows: list[list[int]]
    file_id: str
    file_sha256: str
    tokens_sha256: str
    first_doc: int
    docs_used: int

    @property
    def seq_len(self) -> int:
        return len(self.windows[0])

    @property
    def scored_tokens(self) -> int:
        return len(self.windows) * (self.seq_len - 1)

    def provenance(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "file_sha256": self.file_sha256, "tokens_sha256": self.tokens_sha256,
                "documents": f"LongBench multi_news examples {self.first_doc}..{self.first_doc + self.docs_used - 1} "
                             f"(file order), context field, NEWLINE_CHAR -> newline, EOS-joined",
                "num_windows": len(self.windows), "seq_len": self.seq_len, "scored_tokens": self.scored_tokens}


def heldout_text(tokenizer: Any, num_windows: int = 32, seq_len: int = 1024, first_doc: int = 0,
                 eos_token_id: int | None = None) -> EvalText:
    """The evaluation windows described in the module docstring."""
    from morphserve.data.mirror import resolve

    if num_windows <= 0 or seq_len < 2:
        raise ValueError(f"need num_windows >= 1 and seq_len >= 2, got {num_windows}, {seq_len}")
    path = resolve(EVAL_FILE_ID)
    raw = path.read_bytes()
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    if not 0 <= first_doc < len(rows):
        raise ValueError(f"first_doc {first_doc} is outside the {len(rows)} Multi-News examples")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    need = num_windows * seq_len
    ids: list[int] = []
    used = 0
    for row in rows[first_doc:]:
        text = row["context"].replace(" NEWLINE_CHAR ", "\n").replace("NEWLINE_CHAR", "\n")
        if ids and eos is not None:
            ids.append(int(eos))
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        used += 1
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"{path}: only {len(ids)} tokens from examples {first_doc}.., {need} requested")
    windows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_windows)]
    digest = hashlib.sha256(torch.tensor(windows, dtype=torch.int32).numpy().tobytes()).hexdigest()
    return EvalText(windows, EVAL_FILE_ID, hashlib.sha256(raw).hexdigest(), digest, first_doc, used)


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` predictions."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


@torch.no_grad()
def nll_hf(model: Any, windows: list[list[int]], batch_size: int = 4, desc: str = "perplexity") -> NLL:
    """Teacher-forced NLL of a transformers causal LM over ``windows`` (per-token losses in float32, summed in
    float64)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        ids = torch.tensor(windows[b:b + batch_size], dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none")
        total += float(loss.double().sum())
        count += ids[:, 1:].numel()
    return NLL(total, count)


@torch.no_grad()
def load_layer_weights(model: Any, i: int, dense: dict[str, torch.Tensor], q_size: int, kv_size: int,
                       intermediate: int) -> None:
    """Write one layer's dense weights (FP16-layout names: input_norm, qkv, o, post_norm, gate_up, down) into layer
    ``i`` of a transformers Llama model, splitting ``qkv = [q; k; v]`` and ``gate_up = [gate; up]``."""
    layer = model.model.layers[i]
    a, m = layer.self_attn, layer.mlp
    qkv, gu = dense["qkv"], dense["gate_up"]
    pairs = [(layer.input_layernorm.weight, dense["input_norm"]), (a.q_proj.weight, qkv[:q_size]),
             (a.k_proj.weight, qkv[q_size:q_size + kv_size]), (a.v_proj.weight, qkv[q_size + kv_size:]),
             (a.o_proj.weight, dense["o"]), (layer.post_attention_layernorm.weight, dense["post_norm"]),
             (m.gate_proj.weight, gu[:intermediate]), (m.up_proj.weight, gu[intermediate:]),
             (m.down_proj.weight, dense["down"])]
    for param, value in pairs:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"layer {i}: weight of shape {tuple(value.shape)} for a parameter of shape "
                             f"{tuple(param.shape)}")
        param.copy_(value)


@torch.no_grad()
def nll_engine(model: "LlamaModel", token_ids: list[int], block_size: int = 16) -> NLL:
    """Teacher-forced NLL of the engine's model on one sequence, run as a single prefill through
    :meth:`LlamaModel.forward` (each layer at its current precision) with a private paged KV pool."""
    from morphserve.memory.kv_pool import KVPool
    from morphserve.model.llama import ForwardBatch

    n = len(token_ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens, got {n}")
    if n > model.cfg.max_position_embeddings:
        raise ValueError(f"{n} tokens exceed the model's {model.cfg.max_position_embeddings} positions")
    blocks = -(-n // block_size)
    pool = KVPool(model.cfg, blocks, block_size, model.dtype, model.device)
    dev = model.device
    table = list(range(blocks))
    pos = torch.arange(n, dtype=torch.int64, device=dev)
    batch = ForwardBatch(token_ids=torch.tensor(token_ids, dtype=torch.int64, device=dev), positions=pos,
                         slot_mapping=pos.clone(), query_start=[0, n], context_lens=[n], block_tables=[table],
                         logits_indices=torch.arange(n - 1, dtype=torch.int64, device=dev))
    logits = model.forward(batch, pool)
    target = torch.tensor(token_ids[1:], dtype=torch.int64, device=dev)
    loss = F.cross_entropy(logits.float(), target, reduction="none")  # per token in float32, summed in float64
    return NLL(float(loss.double().sum()), n - 1)

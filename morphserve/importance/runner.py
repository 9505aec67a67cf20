"""Layer-by-layer forward of the engine's decoder on dense token windows, with any precision per layer.

Importance profiling needs what :meth:`LlamaModel.forward <morphserve.model.llama.LlamaModel.forward>` does not
expose: the residual stream between layers, one layer run at a chosen precision on a recorded input, and many
precision configurations of the same model evaluated side by side.  :class:`LayerRunner` provides these on a batch
of equal-length windows (``[B, T]`` token ids, each window a separate sequence starting at position 0, no padding).

What a layer computes is the engine's decoder layer, written for dense causal windows instead of a paged KV pool:
the same reference RMSNorm, rotate-half RoPE on the model's own cos/sin tables and SiLU-and-mul
(:mod:`morphserve.kernels.reference`), and every projection through :func:`morphserve.model.linear.linear`, i.e. the
kernel registered for the layer weights' precision (dequantize + ``F.linear`` on CPU).  Attention is causal
``scaled_dot_product_attention`` over the window, as the reference paged attention computes it for a single
prefill.  ``tests/test_importance.py`` checks that the runner's logits equal the engine's forward, with layers
swapped in place through :meth:`StagedVariants.write_into`, on tiny models.

Weights.  FP16 layers are the arena's own views, so the model must be all-FP16 (checked on every use).  A quantized
layer is a :class:`LayerWeights` over the staged variant's tensors (``StagedVariants.tensors(i, p)``, moved to the
model's device once and cached): the same bytes that ``write_into`` would copy into the slot, under the same
layout, so the kernels see exactly what a swapped-in layer holds.  The model itself is never modified.

Units.  Hidden states are the residual stream in the model's compute dtype, ``[..., T, hidden]``: the *input* of
layer ``i`` is the residual stream before it and its *output* the residual stream after it (Hugging Face's
``hidden_states`` convention).  Work is processed in chunks of at most ``max_rows`` tokens to bound the memory of
the FFN intermediate (``max_rows * 2 * intermediate`` elements).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from morphserve.kernels import reference as ref
from morphserve.memory.weight_arena import LayerWeights, Precision
from morphserve.model.linear import linear

if TYPE_CHECKING:
    from morphserve.model.llama import LlamaModel
    from morphserve.quant.staging import StagedVariants

Config = tuple[Precision, ...]
"""The precision of every decoder layer, layer 0 first."""


def quantized_config(num_layers: int, layers: Iterable[int], precision: Precision) -> Config:
    """The configuration with ``layers`` at ``precision`` and every other layer FP16."""
    chosen = set(layers)
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"layers {bad} are outside [0, {num_layers})")
    return tuple(precision if i in chosen else Precision.FP16 for i in range(num_layers))


class LayerRunner:
    """Runs the decoder of ``model`` one layer at a time (see the module docstring)."""

    def __init__(self, model: "LlamaModel", variants: "StagedVariants | None" = None, max_rows: int = 8192):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if variants is not None and (variants.cfg != model.cfg or variants.dtype != model.dtype):
            raise ValueError("the staged variants were built for another model config or dtype than this model")
        self.model = model
        self.cfg = model.cfg
        self.variants = variants
        self.max_rows = max_rows
        self._quantized: dict[tuple[int, Precision], LayerWeights] = {}
        self._check_fp16()

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _check_fp16(self) -> None:
        swapped = [lw.index for lw in self.model.arena.layers if lw.precision != Precision.FP16]
        if swapped:
            raise ValueError(f"layers {swapped} of the model are not FP16; the runner reads FP16 weights from the "
                             f"arena and needs an all-FP16 model")

    def weights(self, i: int, precision: Precision) -> LayerWeights:
        """Layer ``i``'s weights at ``precision``."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range [0, {self.num_layers})")
        if precision == Precision.FP16:
            lw = self.model.arena.layers[i]
            if lw.precision != Precision.FP16:
                raise ValueError(f"layer {i} of the model was swapped to {lw.precision.value}; the runner needs the "
                                 f"FP16 arena")
            return lw
        key = (i, precision)
        if key not in self._quantized:
            if self.variants is None:
                raise ValueError(f"layer {i} at {precision.value} needs staged variants; none were given")
            tensors = {n: t.to(self.device) for n, t in self.variants.tensors(i, precision).items()}
            self._quantized[key] = LayerWeights(i, precision, tensors)
        return self._quantized[key]

    # ---- the forward, piece by piece ---------------------------------------------------------------------------
    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` as a ``[B, T]`` int64 tensor on the model's device; raises on a bad shape or id."""
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"token windows must be a non-empty [B, T] tensor, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"windows of {tokens.shape[1]} tokens exceed the model's "
                             f"{self.cfg.max_position_embeddings} positions")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{lo}, {hi}]")
        return tokens.to(device=self.device, dtype=torch.int64)

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input of layer 0: ``[B, T, hidden]``."""
        return self.model.embed[self.check_tokens(tokens)]

    @torch.no_grad()
    def layer(self, i: int, precision: Precision, x: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` at ``precision`` on the residual stream ``x`` (``[..., T, hidden]``, each leading index a
        window starting at position 0); returns the residual stream after the layer, same shape."""
        lw = self.weights(i, precision)
        if x.dim() < 2 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"hidden states must be [..., T, {self.cfg.hidden_size}], got {tuple(x.shape)}")
        lead, t = x.shape[:-2], x.shape[-2]
        flat = x.reshape(-1, t, self.cfg.hidden_size)
        per_chunk = max(1, self.max_rows // t)
        out = torch.cat([self._layer(lw, flat[s:s + per_chunk]) for s in range(0, flat.shape[0], per_chunk)])
        return out.reshape(*lead, t, self.cfg.hidden_size)

    def _layer(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        b, t, hid = x.shape
        rows = x.reshape(b * t, hid)
        qkv = linear(ref.rms_norm(rows, lw["input_norm"], eps), lw, "qkv").view(b, t, -1)
        q_size, kv_size, hd = cfg.q_size, cfg.kv_size, cfg.head_dim
        q = qkv[..., :q_size].reshape(b, t, cfg.num_heads, hd)
        k = qkv[..., q_size:q_size + kv_size].reshape(b, t, cfg.num_kv_heads, hd)
        v = qkv[..., q_size + kv_size:].reshape(b, t, cfg.num_kv_heads, hd)
        cos, sin = self.model.cos[:t], self.model.sin[:t]
        q = ref.rotary(q, cos, sin).transpose(1, 2)  # [b, heads, t, hd]
        k = ref.rotary(k, cos, sin).transpose(1, 2)
        group = cfg.num_heads // cfg.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.transpose(1, 2).repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.model.scale)
        attn = attn.transpose(1, 2).reshape(b * t, q_size)
        h, residual = ref.add_rms_norm(linear(attn, lw, "o"), rows, lw["post_norm"], eps)
        out = residual + linear(ref.silu_and_mul(linear(h, lw, "gate_up")), lw, "down")
        return out.view(b, t, hid)

    @torch.no_grad()
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final RMSNorm of the last layer's output: what the LM head reads."""
        return ref.rms_norm(x, self.model.final_norm, self.cfg.rms_norm_eps)

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 next-token logits of final-normed hidden states ``[..., hidden]``."""
        return F.linear(h, self.model.lm_head).float()

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, config: Sequence[Precision] | None = None,
            keep_states: bool = False) -> list[torch.Tensor]:
        """The whole decoder under ``config`` (default all FP16).  Returns ``[final-normed hidden]``, or with
        ``keep_states`` the residual stream at every layer boundary (``L + 1`` tensors: the input of layer 0, ...,
        the output of layer L-1) followed by the final-normed hidden state."""
        config = self.check_config(config)
        x = self.embed(tokens)
        states = [x] if keep_states else []
        for i, p in enumerate(config):
            x = self.layer(i, p, x)
            if keep_states:
                states.append(x)
        return states + [self.final_norm(x)]

    def check_config(self, config: Sequence[Precision] | None) -> Config:
        if config is None:
            return (Precision.FP16,) * self.num_layers
        config = tuple(Precision(p) for p in config)
        if len(config) != self.num_layers:
            raise ValueError(f"a configuration needs one precision per layer ({self.num_layers}), got {len(config)}")
        return config

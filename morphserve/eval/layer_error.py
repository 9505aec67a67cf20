"""Per-layer output error of a quantized layer variant, on real activations, with the FP16 input.

For every decoder layer ``l`` of a transformers Llama model, the FP16 model is run once on real text while a hook
records each layer's exact inputs (hidden states, RoPE tables, mask) and output.  Then, for a variant, only layer
``l``'s weights are replaced by the variant's dequantized weights and layer ``l`` alone is re-run on the *recorded
FP16 input*, so the error is the layer's own (the paper's LRS setting), not drift accumulated in earlier layers.

Metrics, over all tokens of the sample (``y``: FP16 output, ``y_q``: variant output, ``x``: the layer input):

* ``rel_l2 = ||y_q - y|| / ||y||`` (Frobenius norms over tokens x hidden);
* ``cosine``: mean over tokens of ``cos(y_q[t], y[t])``;
* ``update_rel_l2 = ||y_q - y|| / ||y - x||``: the error relative to what the layer adds to the residual stream
  (the output is dominated by the residual, which hides the error in ``rel_l2``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class LayerError:
    layer: int
    rel_l2: float
    cosine: float
    update_rel_l2: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class _Capture:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def capture_layers(model: Any, token_ids: list[list[int]]) -> list[_Capture]:
    """Run ``model`` once on ``token_ids`` (equal-length rows) and record every decoder layer's call."""
    device = next(model.parameters()).device
    captures: list[_Capture | None] = [None] * len(model.model.layers)
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, i: int = i) -> None:
            captures[i] = _Capture(args, dict(kwargs), _first(output).detach().clone())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        model(input_ids=torch.tensor(token_ids, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(captures) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called")
    return [c for c in captures if c is not None]


def _layer_input(c: _Capture) -> torch.Tensor:
    return c.args[0] if c.args else c.kwargs["hidden_states"]


@torch.no_grad()
def layer_errors(model: Any, captures: list[_Capture],
                 set_variant: Callable[[int], None], restore: Callable[[int], None],
                 desc: str = "layer error") -> list[LayerError]:
    """The error of each layer's variant: ``set_variant(l)`` writes the variant's weights into layer ``l`` of
    ``model``, ``restore(l)`` puts the FP16 weights back."""
    out = []
    for i, c in enumerate(tqdm(captures, desc=desc, unit="layer", leave=False)):
        set_variant(i)
        try:
            y_q = _first(model.model.layers[i](*c.args, **c.kwargs)).float()
        finally:
            restore(i)
        y, x = c.output.float(), _layer_input(c).float()
        err = (y_q - y).norm()
        out.append(LayerError(
            layer=i,
            rel_l2=float(err / y.norm()),
            cosine=float(F.cosine_similarity(y_q.reshape(-1, y.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1).mean()),
            update_rel_l2=float(err / (y - x).norm()),
        ))
    return out

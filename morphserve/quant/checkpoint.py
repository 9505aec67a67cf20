"""What every pre-quantized W4 checkpoint loader shares: reading tensors with checks, and assembling layers.

A pre-quantized checkpoint is a Hugging Face directory (``config.json`` with a ``quantization_config`` and
``*.safetensors``).  A format-specific subclass (:mod:`morphserve.quant.awq_gemm`,
:mod:`morphserve.quant.compressed_tensors`) validates the quantization config and converts one linear module into the
engine's W4 layout (:meth:`QuantizedCheckpoint.w4_linear`); this base class fuses the projections the way the engine
stores them (``qkv = [q; k; v]``, ``gate_up = [gate; up]``) and takes the layer's norms from the checkpoint, since
AWQ may have rescaled them.

Every defect (missing tensor, wrong dtype or shape, wrong group size, unsupported bit width, a checkpoint of another
model) raises :class:`~morphserve.quant.packing.QuantFormatError` naming the file, tensor and value.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from morphserve.model.config import ModelConfig, ModelError
from morphserve.quant.layouts import w4_group_size
from morphserve.quant.packing import QuantFormatError, W4Weight

# engine projection -> the Hugging Face modules fused into it, in row order
FUSED_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


class QuantizedCheckpoint(ABC):
    """A directory holding a W4 checkpoint.  ``config`` is its ModelConfig, ``group_size`` its W4 group size."""

    method: str = ""  # short name recorded in variant metadata
    group_size: int

    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise QuantFormatError(f"{self.path}: not a checkpoint directory (no config.json)")
        raw = json.loads(cfg_file.read_text())
        qc = raw.get("quantization_config")
        if not isinstance(qc, dict):
            raise QuantFormatError(f"{cfg_file}: no quantization_config; this is not a pre-quantized checkpoint")
        self.quantization_config: dict[str, Any] = qc
        try:
            self.config = ModelConfig.from_hf(AutoConfig.from_pretrained(self.path), name=self.path.name)
        except ModelError:
            raise
        except Exception as e:  # transformers raises several types for a broken config
            raise QuantFormatError(f"{cfg_file}: cannot be read as a model config: {e}") from e
        self._files = self._index()
        self._handles: dict[Path, Any] = {}
        self._parse_quantization_config(qc)

    # ---- format-specific ------------------------------------------------------------------------------------
    @abstractmethod
    def _parse_quantization_config(self, qc: dict[str, Any]) -> None:
        """Validate the format's quantization_config and set ``self.group_size``."""

    @abstractmethod
    def w4_linear(self, module: str, n: int, k: int, dtype: torch.dtype) -> W4Weight:
        """Linear module ``module`` (e.g. ``model.layers.0.self_attn.q_proj``) of shape ``[n, k]`` in the engine's
        W4 layout with scales and zeros in ``dtype``."""

    @property
    def description(self) -> str:
        return f"{self.method} checkpoint {self.path} (W4, group size {self.group_size})"

    # ---- tensor access --------------------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise QuantFormatError(f"{self.path}: no *.safetensors weight files")
        out: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                out.update({key: f for key in h.keys()})
        return out

    def has(self, name: str) -> bool:
        return name in self._files

    def tensor(self, name: str, *, dtypes: tuple[torch.dtype, ...] | None = None,
               shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read tensor ``name`` (CPU), checking its dtype against ``dtypes`` and its shape against ``shape``."""
        from safetensors import safe_open

        f = self._files.get(name)
        if f is None:
            raise QuantFormatError(f"{self.path}: checkpoint has no tensor {name!r}")
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt").__enter__()
            except Exception as e:
                raise QuantFormatError(f"{f}: corrupt or unreadable safetensors file: {e}") from e
        t = self._handles[f].get_tensor(name)
        if dtypes is not None and t.dtype not in dtypes:
            raise QuantFormatError(f"{f}: tensor {name!r} has dtype {t.dtype}, expected one of "
                                   f"{[str(d) for d in dtypes]}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise QuantFormatError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    # ---- the engine's view ----------------------------------------------------------------------------------
    def check_compatible(self, cfg: ModelConfig, final_norm: torch.Tensor | None = None) -> None:
        """Raise unless this checkpoint quantizes a model with ``cfg``'s shapes, at the engine's group size for
        ``cfg``, and (when ``final_norm`` is given) the same final norm weights (AWQ never changes them, so a
        difference means a quantized checkpoint of another model)."""
        mine = self.config
        for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size"):
            if getattr(mine, f) != getattr(cfg, f):
                raise QuantFormatError(f"{self.path}: {f}={getattr(mine, f)} but the served model "
                                       f"{cfg.name!r} has {f}={getattr(cfg, f)}")
        want = w4_group_size(cfg)
        if self.group_size != want:
            raise QuantFormatError(f"{self.path}: W4 group size {self.group_size} but the engine's W4 layout for "
                                   f"{cfg.name!r} uses group size {want} (morphserve.quant.layouts.w4_group_size)")
        if final_norm is not None:
            theirs = self.tensor("model.norm.weight", shape=tuple(final_norm.shape)).to(torch.float32)
            ours = final_norm.detach().to("cpu", torch.float32)
            diff = float((theirs - ours).abs().max())
            tol = 1e-2 * float(ours.abs().max()) + 1e-6  # float16 round trips stay far below this
            if diff > tol:
                raise QuantFormatError(f"{self.path}: model.norm.weight differs from the served model's by up to "
                                       f"{diff:.3g} (tolerance {tol:.3g}): a quantized checkpoint of another model?")

    def layer(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer ``i``'s W4 variant as named tensors of the engine's W4 layout (norms in ``dtype``)."""
        cfg = self.config
        if not 0 <= i < cfg.num_layers:
            raise IndexError(f"layer {i} out of range [0, {cfg.num_layers})")
        p = f"model.layers.{i}."
        h = cfg.hidden_size
        rows = {"self_attn.q_proj": cfg.q_size, "self_attn.k_proj": cfg.kv_size, "self_attn.v_proj": cfg.kv_size,
                "self_attn.o_proj": h, "mlp.gate_proj": cfg.intermediate_size, "mlp.up_proj": cfg.intermediate_size,
                "mlp.down_proj": h}
        cols = {"self_attn.o_proj": cfg.q_size, "mlp.down_proj": cfg.intermediate_size}
        out = {
            "input_norm": self.tensor(p + "input_layernorm.weight", shape=(h,)).to(dtype),
            "post_norm": self.tensor(p + "post_attention_layernorm.weight", shape=(h,)).to(dtype),
        }
        for proj, modules in FUSED_MODULES.items():
            parts = [self.w4_linear(p + m, rows[m], cols.get(m, h), dtype) for m in modules]
            fused = W4Weight.concat_out(parts) if len(parts) > 1 else parts[0]
            out.update(fused.validate(f"layer {i} {proj}").tensors(proj))
        return out

    def _require_quantized(self, module: str, packed_name: str) -> None:
        if not self.has(f"{module}.{packed_name}"):
            if self.has(f"{module}.weight"):
                raise QuantFormatError(f"{self.path}: {module} is not quantized in this checkpoint (it stores a dense "
                                       f"{module}.weight); every decoder projection must be W4")
            raise QuantFormatError(f"{self.path}: checkpoint has no tensor {module + '.' + packed_name!r}")

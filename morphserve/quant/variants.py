"""Every precision variant of every decoder layer: FP16, W8 and W4, built once at load time.

A *variant* of layer ``i`` at precision ``p`` is a dict of named tensors matching ``layout_for(p, cfg, dtype)``
exactly (names, shapes, dtypes): the bytes a slot holds when layer ``i`` runs at ``p``
(:mod:`morphserve.quant.staging` turns them into pinned host buffers).

Sources:

* FP16: the served weights, read from the arena slot while every layer is still FP16.
* W8: round-to-nearest from the FP16 weights (:func:`morphserve.quant.rtn.quantize_w8_rtn`), FP16 norms.
* W4: either round-to-nearest from the FP16 weights (``"rtn"``; synthetic-weight models always use it), or a
  pre-quantized checkpoint (:class:`~morphserve.quant.awq_gemm.AWQGemmCheckpoint`,
  :class:`~morphserve.quant.compressed_tensors.CompressedTensorsCheckpoint`; llm-compressor AWQ calibration writes
  the latter, :mod:`morphserve.quant.calibrate`).  A checkpoint's variant carries the checkpoint's norms, which AWQ
  rescaled to match its rescaled projections.

Every variant records a :class:`VariantInfo` (method, source, group size, calibration provenance).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from morphserve.memory.weight_arena import LayerLayout, Precision, layout_for
from morphserve.model.config import ModelConfig
from morphserve.quant.checkpoint import QuantizedCheckpoint
from morphserve.quant.layouts import PROJECTIONS, projection_shapes, w4_group_size
from morphserve.quant.packing import QuantFormatError, dequantize_w4, dequantize_w8
from morphserve.quant.rtn import quantize_w4_rtn, quantize_w8_rtn

if TYPE_CHECKING:
    from morphserve.model.llama import LlamaModel
    from morphserve.model.weight_source import WeightSource

log = logging.getLogger(__name__)

NORMS = ("input_norm", "post_norm")
# Above this v_row_scale_drift a W4 checkpoint variant is taken to rescale the V cache's units (4-bit noise alone
# gives about 0.01 on SmolLM2 and the tiny test models; AWQ factors are typically 2x, i.e. 0.7).
V_DRIFT_WARN = 0.1


@dataclass(frozen=True)
class VariantInfo:
    """Where one precision's variants come from (the same for every layer of a model)."""

    precision: str
    method: str  # "fp16", "rtn", "awq-gemm", "compressed-tensors"
    source: str
    group_size: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def open_w4_checkpoint(path: str | Path) -> QuantizedCheckpoint:
    """Open a pre-quantized W4 checkpoint directory, picking the loader from ``quantization_config.quant_method``."""
    from morphserve.quant.awq_gemm import AWQGemmCheckpoint
    from morphserve.quant.compressed_tensors import CompressedTensorsCheckpoint

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise QuantFormatError(f"{path}: not a checkpoint directory (no config.json)")
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not isinstance(qc, dict):
        raise QuantFormatError(f"{cfg_file}: no quantization_config; this is not a pre-quantized checkpoint")
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return AWQGemmCheckpoint(path)
    if method == "compressed-tensors":
        return CompressedTensorsCheckpoint(path)
    raise QuantFormatError(f"{cfg_file}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
                           f"supported; expected 'awq' (GEMM) or 'compressed-tensors' (pack-quantized)")


def resolve_w4_source(source: "WeightSource", spec: str = "auto",
                      **calibration_kwargs: Any) -> tuple[str | QuantizedCheckpoint, dict[str, Any]]:
    """The W4 source for a served model, and its provenance, from a user-facing spec:

    * ``"rtn"``: round-to-nearest from the served weights;
    * ``"awq"``: llm-compressor AWQ of the served checkpoint (cached; :func:`morphserve.quant.calibrate.
      quantize_checkpoint`, ``calibration_kwargs`` passed on); only for real checkpoint directories;
    * ``"auto"``: ``"awq"`` for real checkpoints, ``"rtn"`` for synthetic weights (AWQ needs real activations);
    * a path: a pre-quantized AWQ GEMM or compressed-tensors checkpoint directory.
    """
    from morphserve.quant.calibrate import quantize_checkpoint, read_quant_provenance

    real_dir = None if source.synthetic else getattr(source, "path", None)
    if spec == "auto":
        spec = "awq" if real_dir is not None else "rtn"
    if spec == "rtn":
        return "rtn", {"method": "rtn"}
    if spec == "awq":
        if real_dir is None:
            raise ValueError(f"W4 source 'awq' needs a real checkpoint directory; {source.config.name!r} has "
                             f"{'synthetic' if source.synthetic else 'no on-disk'} weights (use 'rtn')")
        out = quantize_checkpoint(real_dir, "awq", name=source.config.name, **calibration_kwargs)
        return open_w4_checkpoint(out), read_quant_provenance(out)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"W4 source {spec!r}: expected 'auto', 'rtn', 'awq' or a checkpoint directory")
    return open_w4_checkpoint(path), read_quant_provenance(path) or {"checkpoint": str(path)}


# ---- building one layer's variants ------------------------------------------------------------------------------
def fp16_layer(model: "LlamaModel", i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s FP16 tensors (views into its arena slot); the layer must currently be FP16."""
    lw = model.arena.layers[i]
    if lw.precision != Precision.FP16:
        raise ValueError(f"layer {i} is at {lw.precision.value}; variants are built from FP16 layers")
    return dict(lw.tensors)


def w8_rtn_layer(fp16: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The W8 variant of one layer from its FP16 tensors (round-to-nearest, per output channel)."""
    out = {n: fp16[n] for n in NORMS}
    for p in PROJECTIONS:
        out.update(quantize_w8_rtn(fp16[p]).tensors(p))
    return out


def w4_rtn_layer(fp16: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """The W4 variant of one layer from its FP16 tensors (round-to-nearest, asymmetric, groups of ``group_size``)."""
    out = {n: fp16[n] for n in NORMS}
    for p in PROJECTIONS:
        out.update(quantize_w4_rtn(fp16[p], group_size).tensors(p))
    return out


def check_variant(tensors: dict[str, torch.Tensor], layout: LayerLayout, where: str) -> None:
    """Raise QuantFormatError unless ``tensors`` has exactly the layout's names, shapes and dtypes."""
    names = {s.name for s in layout.specs}
    missing, extra = sorted(names - tensors.keys()), sorted(tensors.keys() - names)
    if missing or extra:
        raise QuantFormatError(f"{where}: {layout.precision.value} variant is missing tensors {missing} and has "
                               f"unexpected tensors {extra}")
    for s in layout.specs:
        t = tensors[s.name]
        if tuple(t.shape) != s.shape or t.dtype != s.dtype:
            raise QuantFormatError(f"{where}: tensor {s.name!r} is {t.dtype} {tuple(t.shape)}, the "
                                   f"{layout.precision.value} layout needs {s.dtype} {s.shape}")


class VariantBuilder:
    """Builds the variants of each layer of a loaded (all-FP16) model.

    ``w4`` is ``"rtn"`` or an opened W4 checkpoint; a checkpoint is checked against the served model first (shapes,
    the engine's group size for this model, the same final norm)."""

    def __init__(self, model: "LlamaModel", w4: str | QuantizedCheckpoint = "rtn",
                 calibration: dict[str, Any] | None = None):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.dtype = model.dtype
        self.group_size = w4_group_size(self.cfg)
        if isinstance(w4, str):
            if w4 != "rtn":
                raise ValueError(f"W4 source {w4!r}: expected 'rtn' or an opened W4 checkpoint "
                                 f"(morphserve.quant.variants.open_w4_checkpoint)")
        else:
            w4.check_compatible(self.cfg, model.final_norm)
        self.w4 = w4
        self.v_drift: dict[int, float] = {}  # per layer, for W4 checkpoint variants (see v_row_scale_drift)
        self.info = {
            Precision.FP16: VariantInfo(Precision.FP16.value, "fp16", "served weights"),
            Precision.W8: VariantInfo(Precision.W8.value, "rtn", "round-to-nearest from the served weights"),
            Precision.W4: (VariantInfo(Precision.W4.value, "rtn", "round-to-nearest from the served weights",
                                       self.group_size)
                           if isinstance(w4, str) else
                           VariantInfo(Precision.W4.value, w4.method, str(w4.path), w4.group_size,
                                       dict(calibration or {}))),
        }

    @torch.no_grad()
    def layer(self, i: int, precision: Precision) -> dict[str, torch.Tensor]:
        """Layer ``i``'s variant at ``precision`` (on the model's device for FP16/RTN, on CPU from a checkpoint),
        checked against the registered layout."""
        fp16 = fp16_layer(self.model, i)
        if precision == Precision.FP16:
            out = fp16
        elif precision == Precision.W8:
            out = w8_rtn_layer(fp16)
        elif precision == Precision.W4:
            if isinstance(self.w4, str):
                out = w4_rtn_layer(fp16, self.group_size)
            else:
                out = self.w4.layer(i, self.dtype)
                drift = v_row_scale_drift(fp16, dequantize_variant(out, Precision.W4, self.cfg), self.cfg)
                self.v_drift[i] = drift
                if drift > V_DRIFT_WARN:
                    log.warning("layer %d: the W4 checkpoint changes the units of V (median |log| row-norm ratio "
                                "%.3f > %.2f): an AWQ v_proj->o_proj scale? K/V written at one precision will be "
                                "misread at the other after a swap", i, drift, V_DRIFT_WARN)
        else:
            raise ValueError(f"no variant builder for precision {precision!r}")
        check_variant(out, layout_for(precision, self.cfg, self.dtype), f"layer {i}")
        return out


# ---- reading variants back --------------------------------------------------------------------------------------
def dequantize_variant(tensors: dict[str, torch.Tensor], precision: Precision,
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A variant as dense weights under the FP16 layout's names (``input_norm, qkv, o, post_norm, gate_up, down``),
    through the reference dequantizers; FP16 variants are returned as they are."""
    if precision == Precision.FP16:
        return dict(tensors)
    out = {n: tensors[n] for n in NORMS}
    for p in PROJECTIONS:
        if precision == Precision.W8:
            out[p] = dequantize_w8(tensors[f"{p}.qweight"], tensors[f"{p}.scales"])
        elif precision == Precision.W4:
            out[p] = dequantize_w4(tensors[f"{p}.qweight"], tensors[f"{p}.scales"], tensors[f"{p}.zeros"],
                                   w4_group_size(cfg))
        else:
            raise ValueError(f"cannot dequantize precision {precision!r}")
        want = projection_shapes(cfg)[p]
        if tuple(out[p].shape) != want:
            raise QuantFormatError(f"{p}: dequantized shape {tuple(out[p].shape)}, expected {want}")
    return out


def v_row_scale_drift(fp16: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], cfg: ModelConfig) -> float:
    """Median over V output channels of ``|log(||v_variant[c]|| / ||v_fp16[c]||)|`` for the *effective* V weights
    ``W_v * diag(input_norm)`` (the map from the normalized hidden state to the values the V cache stores, so an AWQ
    scale folded between ``input_layernorm`` and ``v_proj`` cancels out).

    Quantization noise alone moves these row norms by about a percent; an AWQ ``v_proj -> o_proj`` scale moves them
    by the AWQ factors, which makes K/V written at one precision and read at another inconsistent (see
    :mod:`morphserve.quant.awq_gemm`)."""
    lo = cfg.q_size + cfg.kv_size

    def rows(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return (t["qkv"][lo:].float().cpu() * t["input_norm"].float().cpu().unsqueeze(0)).norm(dim=1)

    a, b = rows(fp16), rows(dense)
    ok = (a > 0) & (b > 0)
    if not bool(ok.any()):
        return 0.0
    return float((b[ok] / a[ok]).log().abs().median())

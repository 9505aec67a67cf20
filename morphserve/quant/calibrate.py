"""W4 quantization of a real FP16 checkpoint with llm-compressor: AWQ (activation-aware scaling) or round-to-nearest.

:func:`quantize_checkpoint` runs llm-compressor's ``oneshot`` on a Hugging Face checkpoint directory and writes a
compressed-tensors ``pack-quantized`` W4A16 checkpoint (asymmetric, groups of ``w4_group_size(cfg)``), which
:class:`~morphserve.quant.compressed_tensors.CompressedTensorsCheckpoint` loads into the engine layout.

* ``method="awq"``: ``AWQModifier`` (grid search of per-channel scales on calibration activations, duo scaling) then
  ``QuantizationModifier``.  The AWQ mappings are ``input_layernorm -> q/k/v``, ``post_attention_layernorm ->
  gate/up`` and ``up_proj -> down_proj``.  llm-compressor's default also smooths ``v_proj -> o_proj``; it is left out
  here because that scale changes the values stored in the V cache, so K/V written by a layer at FP16 could not be
  read by the same layer at W4 after a runtime swap (or the reverse).  With these mappings the rescaled tensors
  (the two norms, every projection) all belong to one layer's variant, and the layer's K/V outputs keep their units.
* ``method="rtn"``: ``QuantizationModifier`` alone (min-max round-to-nearest, no calibration data); an explicit
  option and a cross-check of :mod:`morphserve.quant.rtn`.

Calibration text comes from the data mirror and never from an evaluation pool: by default the transcripts of the
QMSum *test* split (``qmsum_test``; the workloads draw QMSum prompts from the validation split, and perplexity is
measured on Multi-News), formatted as LongBench formats QMSum (``"{speaker}: {content}"`` lines), tokenized meeting
by meeting in file order, concatenated, and cut into ``num_samples`` consecutive windows of ``seq_len`` tokens.
The sha256 of the source file and of the exact token windows is recorded with the checkpoint.

Results are cached under ``cache_dir()/quant/`` by a key over the model's weights (sha256 of its safetensors files),
the method, group size, calibration token hash, AWQ settings and the llm-compressor version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from morphserve.paths import cache_dir
from morphserve.quant.layouts import w4_group_size

CALIBRATION_FILE_ID = "qmsum_test"
PROVENANCE_FILE = "morphserve_quant_provenance.json"
AWQ_MAPPINGS = (
    ("re:.*input_layernorm$", ("re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$")),
    ("re:.*post_attention_layernorm$", ("re:.*gate_proj$", "re:.*up_proj$")),
    ("re:.*up_proj$", ("re:.*down_proj$",)),
)


class CalibrationError(RuntimeError):
    """Calibration that cannot run (bad settings, too little text, a failed llm-compressor run)."""


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration, with their provenance."""

    windows: list[list[int]]
    file_id: str
    file_sha256: str
    tokens_sha256: str  # sha256 of the int32 little-endian token ids, window after window

    @property
    def num_samples(self) -> int:
        return len(self.windows)

    @property
    def seq_len(self) -> int:
        return len(self.windows[0])

    def provenance(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "file_sha256": self.file_sha256, "tokens_sha256": self.tokens_sha256,
                "num_samples": self.num_samples, "seq_len": self.seq_len,
                "text": "QMSum test-split meeting transcripts, '{speaker}: {content}' lines, file order"}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calibration_set(tokenizer: Any, num_samples: int = 16, seq_len: int = 512,
                    file_id: str = CALIBRATION_FILE_ID) -> CalibrationSet:
    """``num_samples`` windows of ``seq_len`` tokens of QMSum test-split transcripts (see the module docstring)."""
    from morphserve.data.mirror import resolve

    if num_samples <= 0 or seq_len <= 1:
        raise CalibrationError(f"calibration needs num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    path = resolve(file_id)
    need = num_samples * seq_len
    ids: list[int] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            meeting = json.loads(line)
            text = "\n".join(f"{t['speaker']}: {t['content']}" for t in meeting["meeting_transcripts"])
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise CalibrationError(f"{path}: only {len(ids)} tokens of calibration text, {need} requested "
                               f"({num_samples} x {seq_len})")
    windows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_samples)]
    digest = hashlib.sha256(torch.tensor(windows, dtype=torch.int32).numpy().tobytes()).hexdigest()
    return CalibrationSet(windows, file_id, _sha256_file(path), digest)


def _weights_sha256(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CalibrationError(f"{model_dir}: no *.safetensors weight files to quantize")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256_file(f).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _no_pinning_without_cuda() -> Iterator[None]:
    """llm-compressor 0.14.0.1's AWQ pins its activation cache unconditionally, which raises on a machine without an
    accelerator.  Pinning only speeds up host-to-device copies, so without CUDA it is skipped (restored after)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def quantize_checkpoint(model_dir: str | Path, method: Literal["awq", "rtn"] = "awq", *,
                        calibration: CalibrationSet | None = None, num_samples: int = 16, seq_len: int = 512,
                        n_grid: int = 20, out_dir: str | Path | None = None, name: str | None = None,
                        force: bool = False) -> Path:
    """Quantize the checkpoint in ``model_dir`` to W4 with llm-compressor; returns the compressed-tensors directory.

    ``calibration`` defaults to :func:`calibration_set` with ``num_samples`` x ``seq_len`` (AWQ only).  The result is
    cached (see the module docstring) unless ``force``; ``out_dir`` overrides the cache location, ``name`` the model
    name used in the cache folder's name (default: the directory's name)."""
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from morphserve.model.config import ModelConfig

    model_dir = Path(model_dir)
    if method not in ("awq", "rtn"):
        raise CalibrationError(f"quantization method {method!r}: expected 'awq' or 'rtn'")
    if n_grid < 3:  # llm-compressor's grid is [0] + (n_grid - 1) points spaced 1 / (n_grid - 2)
        raise CalibrationError(f"AWQ n_grid={n_grid}: at least 3 grid points are needed")
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir), name=name or model_dir.name)
    group = w4_group_size(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method == "awq" and calibration is None:
        calibration = calibration_set(tokenizer, num_samples, seq_len)
    settings: dict[str, Any] = {
        "method": method, "group_size": group, "symmetric": False, "weights_sha256": _weights_sha256(model_dir),
        "llmcompressor": llmcompressor.__version__,
    }
    if method == "awq":
        assert calibration is not None
        settings.update(calibration=calibration.provenance(), n_grid=n_grid, duo_scaling=True,
                        mappings=[[s, list(b)] for s, b in AWQ_MAPPINGS])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir) if out_dir is not None else cache_dir() / "quant" / f"{cfg.name}-w4-{method}-{key}"
    prov_file = out / PROVENANCE_FILE
    if not force and prov_file.is_file() and json.loads(prov_file.read_text()).get("key") == key:
        return out

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=group))
    recipe: list[Any] = [QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    kwargs: dict[str, Any] = {}
    if method == "awq":
        assert calibration is not None
        mappings = [AWQMapping(s, list(b)) for s, b in AWQ_MAPPINGS]
        recipe.insert(0, AWQModifier(mappings=mappings, n_grid=n_grid, duo_scaling=True))
        n = calibration.num_samples
        kwargs = dict(dataset=Dataset.from_dict({"input_ids": calibration.windows,
                                                 "attention_mask": [[1] * calibration.seq_len] * n}),
                      num_calibration_samples=n, max_seq_length=calibration.seq_len,
                      shuffle_calibration_samples=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        reset_session()
        with _no_pinning_without_cuda(), warnings.catch_warnings():
            # llm-compressor saves through its offloading wrapper; transformers then warns about "offloaded modules"
            # although the whole model is in memory.
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            oneshot(model=model, recipe=recipe, tokenizer=tokenizer, output_dir=str(tmp),
                    pipeline="sequential" if method == "awq" else "datafree", **kwargs)
        reset_session()
        from morphserve.provenance import provenance

        (tmp / PROVENANCE_FILE).write_text(json.dumps({"key": key, **settings, "model_dir": str(model_dir),
                                                       "provenance": provenance()}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quant_provenance(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The provenance :func:`quantize_checkpoint` recorded (``{}`` for checkpoints made elsewhere)."""
    f = Path(checkpoint_dir) / PROVENANCE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


__all__ = ["AWQ_MAPPINGS", "CalibrationError", "CalibrationSet", "calibration_set", "quantize_checkpoint",
           "read_quant_provenance"]

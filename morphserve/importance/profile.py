"""Layer-importance profiles: the LIS swap order of a model at one precision, as a JSON file, and its loader.

A profile is computed offline (``morphserve profile --model M --precision w4``, :func:`build_profile`) and read at
serving time (:func:`load_order`).  Location (:func:`profile_path`)::

    cache_dir()/profiles/<model key>/<precision>.json          (round-to-nearest variants)
    cache_dir()/profiles/<model key>/<precision>-<tag>.json    (other variants, e.g. W4 from an AWQ checkpoint)

where the model key is the model's name (``smollm2-135m``, ``llama2-7b``) or, for a checkpoint directory, the
directory's name plus the first 12 hex digits of the sha256 of its resolved path (two checkpoints with the same
folder name do not collide).

The file (``format`` / ``version`` below) holds: the order (least important first); the per-layer raw sensitivities
(LTS, LRS, MDS of each layer alone) and their normalised values over all layers; every greedy step (the chosen
layer and each candidate's raw MDS and LIS); the calibration text's provenance, including the sha256 of its source
files and of the exact token windows; the settings; what the quantized variants were (method, source, group size);
the cost (seconds, token-layers); and :func:`morphserve.provenance.provenance`.

:func:`load_order` returns ``(order, source)``.  Without a profile it falls back to front-to-back (the paper's
fallback), says so in ``source`` and logs a warning.  A profile that exists but is unreadable, of another format,
for another model, precision or layer count raises :class:`ProfileError`: serving with the wrong order must not
happen silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morphserve.importance.orders import CalibrationData, LISOrder, OrderResult, check_order
from morphserve.importance.runner import LayerRunner
from morphserve.memory.weight_arena import Precision
from morphserve.paths import cache_dir
from morphserve.provenance import provenance

if TYPE_CHECKING:
    from morphserve.importance.texts import TokenWindows
    from morphserve.model.llama import LlamaModel
    from morphserve.quant.staging import StagedVariants

log = logging.getLogger(__name__)

PROFILE_FORMAT = "morphserve-layer-importance-profile"
PROFILE_VERSION = 1
QUANTIZED = (Precision.W8, Precision.W4)


class ProfileError(ValueError):
    """A profile file that cannot be used: unreadable, another format, or for another model or precision."""


def model_key(model: str) -> str:
    """The folder name of ``model``'s profiles: its name, or ``<dir name>-<sha256(path)[:12]>`` for a directory."""
    path = Path(model).expanduser()
    if path.is_dir():
        resolved = str(path.resolve())
        return f"{path.resolve().name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"
    if not model or "/" in model or model in (".", ".."):
        raise ValueError(f"model {model!r} is neither a model name nor an existing checkpoint directory")
    return model


def _precision(precision: Precision | str) -> Precision:
    try:
        p = Precision(precision)
    except ValueError:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(q.value for q in QUANTIZED)}") from None
    if p not in QUANTIZED:
        raise ValueError(f"precision {p.value!r} has no swap order; expected one of "
                         f"{', '.join(q.value for q in QUANTIZED)}")
    return p


def _variant_tag(variant: str) -> str:
    if not variant or not all(c.isalnum() or c in "-_." for c in variant) or variant.startswith("."):
        raise ValueError(f"variant tag {variant!r}: use letters, digits, '-', '_' or '.'")
    return variant


def profile_path(model: str, precision: Precision | str, root: Path | None = None, variant: str = "rtn") -> Path:
    """Where the profile of ``model`` at ``precision`` lives (module docstring); ``root`` replaces
    ``cache_dir()/profiles``.  ``variant`` names the quantized variants the order was chosen for: ``rtn`` (the
    engine's round-to-nearest variants) gives ``<precision>.json``, any other tag (e.g. ``awq``, for W4 variants
    from a calibrated checkpoint) ``<precision>-<tag>.json``."""
    base = root if root is not None else cache_dir() / "profiles"
    p, tag = _precision(precision).value, _variant_tag(variant)
    return Path(base) / model_key(model) / (f"{p}.json" if tag == "rtn" else f"{p}-{tag}.json")


def build_profile(model: "LlamaModel", variants: "StagedVariants", precision: Precision | str,
                  calibration: "TokenWindows", *, model_name: str, search_windows: int,
                  normalisation: str = "rank", variant: str = "rtn", max_rows: int = 8192) -> dict[str, Any]:
    """Compute the LIS order of ``model`` at ``precision`` on ``calibration`` windows and return the profile
    document (see the module docstring; :func:`write_profile` saves it)."""
    p = _precision(precision)
    if model.synthetic:
        log.warning("profiling a model with SYNTHETIC weights: its importance order is meaningless")
    t0 = time.perf_counter()
    runner = LayerRunner(model, variants, max_rows=max_rows)
    data = CalibrationData(runner, calibration, search_windows)
    result = LISOrder(normalisation=normalisation).build(model.cfg.num_layers, p, data)
    return profile_document(result, model, variants, model_name=model_name, variant=variant,
                            seconds=time.perf_counter() - t0)


def profile_document(result: OrderResult, model: "LlamaModel", variants: "StagedVariants", *, model_name: str,
                     variant: str = "rtn", seconds: float | None = None) -> dict[str, Any]:
    """The profile document of a LIS :class:`OrderResult` computed for ``model`` with ``variants``."""
    if result.strategy != LISOrder.name:
        raise ValueError(f"a profile holds a {LISOrder.name!r} order, got {result.strategy!r}")
    p = _precision(result.precision)
    if len(result.order) != model.cfg.num_layers:
        raise ValueError(f"an order of {len(result.order)} layers for a {model.cfg.num_layers}-layer model")
    settings = {"strategy": result.strategy, "variant_tag": _variant_tag(variant), **result.settings,
                "compute_dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
    calib = settings.pop("calibration")
    settings.update(search_windows=calib["search_windows"], calibration_windows=calib["num_windows"],
                    seq_len=calib["seq_len"])
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": {"name": model_name, "key": model_key(model_name), "config_name": model.cfg.name,
                  "num_layers": model.cfg.num_layers, "synthetic_weights": model.synthetic},
        "precision": p.value,
        "variant": variants.info[p].to_json() if p in variants.info else None,
        "order": list(result.order),
        "scores": {k: result.details[k] for k in ("lts", "lrs", "mds_alone")},
        "normalised": result.details["normalised_all_layers"],
        "steps": result.details["steps"],
        "calibration": calib,
        "settings": settings,
        "cost": {"seconds": result.seconds if seconds is None else seconds, "order_seconds": result.seconds,
                 "token_layers": result.token_layers},
        "provenance": provenance(device=model.device, synthetic_weights=model.synthetic),
    }


def write_profile(profile: dict[str, Any], path: Path) -> Path:
    """Validate ``profile`` and write it to ``path`` atomically (temporary file, then rename)."""
    _validate(profile, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(profile, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _validate(profile: Any, where: Path | str) -> dict[str, Any]:
    if not isinstance(profile, dict):
        raise ProfileError(f"{where}: a profile is a JSON object, got {type(profile).__name__}")
    if profile.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where}: format {profile.get('format')!r}, expected {PROFILE_FORMAT!r}")
    if profile.get("version") != PROFILE_VERSION:
        raise ProfileError(f"{where}: profile version {profile.get('version')!r}, this code reads "
                           f"version {PROFILE_VERSION}")
    for field in ("model", "precision", "order"):
        if field not in profile:
            raise ProfileError(f"{where}: missing field {field!r}")
    n = profile["model"].get("num_layers") if isinstance(profile["model"], dict) else None
    if not isinstance(n, int) or n < 1:
        raise ProfileError(f"{where}: model.num_layers must be a positive integer, got {n!r}")
    try:
        check_order(profile["order"], n)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: {exc}") from None
    return profile


def read_profile(path: Path) -> dict[str, Any]:
    """The validated profile document at ``path``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from None
    return _validate(doc, path)


def load_order(model: str, precision: Precision | str, num_layers: int, path: Path | None = None,
               root: Path | None = None, variant: str = "rtn") -> tuple[list[int], str]:
    """The swap order of ``model`` at ``precision`` and where it came from.

    Reads ``path`` (default :func:`profile_path`).  Without a file there: front-to-back, with ``source`` saying
    so and a logged warning.  A file for another model, precision, variant or layer count raises
    :class:`ProfileError`."""
    p = _precision(precision)
    path = Path(path) if path is not None else profile_path(model, p, root, variant)
    if not path.is_file():
        source = f"fallback: front-to-back (no layer-importance profile at {path})"
        log.warning("%s %s: %s", model, p.value, source)
        return list(range(num_layers)), source
    doc = read_profile(path)
    if doc["precision"] != p.value:
        raise ProfileError(f"{path}: a {doc['precision']} profile, {p.value} requested")
    if doc["model"].get("key") != model_key(model):
        raise ProfileError(f"{path}: profile of model {doc['model'].get('name')!r}, not {model!r}")
    tag = (doc.get("settings") or {}).get("variant_tag")
    if tag != _variant_tag(variant):
        raise ProfileError(f"{path}: profile chosen for the {tag!r} variants, {variant!r} requested")
    if doc["model"]["num_layers"] != num_layers:
        raise ProfileError(f"{path}: profile of a {doc['model']['num_layers']}-layer model, the model has "
                           f"{num_layers} layers")
    strategy = (doc.get("settings") or {}).get("strategy", "lis")
    tokens_sha = str((doc.get("calibration") or {}).get("tokens_sha256", "unknown"))
    source = f"profile: {path} ({strategy}, calibration tokens sha256 {tokens_sha[:12]})"
    log.info("%s %s swap order from %s", model, p.value, source)
    return list(doc["order"]), source

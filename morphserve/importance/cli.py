"""``morphserve profile``: compute and save a model's layer-importance profile (LIS swap order) per precision.

    morphserve profile --model smollm2-135m                  # W8 and W4 (round-to-nearest variants)
    morphserve profile --model smollm2-135m --precision w4 --search-windows 4
    morphserve profile --model /ckpt/llama-2-7b --precision w4 --w4 /ckpt/llama-2-7b-awq --variant-tag awq

Writes ``cache_dir()/profiles/<model>/<precision>.json`` (:mod:`morphserve.importance.profile`) unless
``--output`` names the file, and prints one JSON line per precision (path, order, seconds).  Calibration text:
the first ``--seq-len`` tokens of each of the first ``--calib-windows`` QMSum test-split meetings
(:mod:`morphserve.importance.texts`); LTS and LRS use all of them, the MDS greedy the first ``--search-windows``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from morphserve.importance.metrics import NORMALISATIONS


def add_parsers(subparsers: Any) -> None:
    """Add the ``profile`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("profile", help="compute a model's layer-importance profile (LIS swap order)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a model name or a Hugging Face checkpoint directory")
    p.add_argument("--precision", action="append", choices=("w8", "w4"),
                   help="precision to profile (repeat for several; default: w8 and w4)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--w4", default="rtn", help="W4 variants: 'rtn' or a W4 checkpoint directory (AWQ GEMM or "
                                               "compressed-tensors)")
    p.add_argument("--variant-tag", default=None,
                   help="with --w4 DIR: the W4 profile's variant tag, in its file name w4-<tag>.json (default 'ckpt')")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows (one per meeting)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--search-windows", type=int, default=2,
                   help="calibration windows used by the MDS greedy (its cost is O(L^3) token-layers)")
    p.add_argument("--normalisation", choices=NORMALISATIONS, default="rank")
    p.add_argument("--max-rows", type=int, default=8192, help="tokens per layer call (memory bound)")
    p.add_argument("--output", type=Path, default=None, help="profile file (only with a single --precision)")
    p.add_argument("--profiles-dir", type=Path, default=None, help="root replacing cache_dir()/profiles")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(fn=cmd_profile)


def w4_variant_tag(w4: str, tag: str | None = None) -> str:
    """The variant tag of a W4 profile: ``rtn`` for round-to-nearest variants, else ``tag`` (default ``ckpt``).
    W8 variants are always round-to-nearest (tag ``rtn``)."""
    return "rtn" if w4 == "rtn" else (tag or "ckpt")


def cmd_profile(a: argparse.Namespace) -> int:
    import torch

    import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
    from morphserve.engine.config import EngineConfig
    from morphserve.importance.profile import build_profile, profile_path, write_profile
    from morphserve.importance.texts import calibration_windows
    from morphserve.memory.weight_arena import Precision
    from morphserve.model.llama import LlamaModel
    from morphserve.model.weight_source import open_source
    from morphserve.quant.staging import StagedVariants
    from morphserve.quant.variants import open_w4_checkpoint

    precisions = [Precision(p) for p in dict.fromkeys(a.precision or ["w8", "w4"])]
    if a.output is not None and len(precisions) != 1:
        raise ValueError(f"--output names one file; {len(precisions)} precisions were requested")
    for name in ("calib_windows", "seq_len", "search_windows", "max_rows"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.w4 == "rtn" and a.variant_tag not in (None, "rtn"):
        raise ValueError(f"--variant-tag {a.variant_tag!r} with round-to-nearest variants: the tag names the W4 "
                         f"variants of a checkpoint (--w4 DIR)")
    engine_cfg = EngineConfig(model=a.model, device=a.device, dtype=a.dtype)
    device = engine_cfg.torch_device()
    dtype = engine_cfg.torch_dtype(device)
    source = open_source(a.model)
    model = LlamaModel(source, dtype, device)
    w4 = "rtn" if a.w4 == "rtn" else open_w4_checkpoint(a.w4)
    staged = StagedVariants.build(model, w4, precisions=(Precision.FP16, *precisions))
    calibration = calibration_windows(source.tokenizer(), a.calib_windows, a.seq_len)
    for p in precisions:
        tag = w4_variant_tag(a.w4, a.variant_tag) if p == Precision.W4 else "rtn"
        doc = build_profile(model, staged, p, calibration, model_name=a.model, search_windows=a.search_windows,
                            normalisation=a.normalisation, variant=tag, max_rows=a.max_rows)
        path = a.output or profile_path(a.model, p, a.profiles_dir, tag)
        write_profile(doc, path)
        print(json.dumps({"precision": p.value, "profile": str(path), "order": doc["order"],
                          "seconds": round(doc["cost"]["seconds"], 1),
                          "token_layers": doc["cost"]["token_layers"]}))
    return 0

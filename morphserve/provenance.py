"""Provenance attached to every result the project writes: commit, device, software, config, seed, time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes).  ``MORPHSERVE_GIT_COMMIT`` overrides it, for
    copies of the tree without git metadata (e.g. a GPU box that receives the working tree only)."""
    if os.environ.get("MORPHSERVE_GIT_COMMIT"):
        return os.environ["MORPHSERVE_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        return "unknown (no git metadata)"
    return sha + ("-dirty" if dirty else "")


def device_name(device: torch.device | str | None = None) -> str:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def provenance(config: dict[str, Any] | None = None, device: torch.device | str | None = None,
               seed: int | None = None, synthetic_weights: bool | None = None) -> dict[str, Any]:
    import transformers

    out: dict[str, Any] = {
        "git_commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if seed is not None:
        out["seed"] = seed
    if synthetic_weights is not None:
        out["synthetic_weights"] = synthetic_weights
        if synthetic_weights:
            out["warning"] = "SYNTHETIC WEIGHTS: performance measurement only; generated text is meaningless"
    if config is not None:
        out["config"] = config
    return out

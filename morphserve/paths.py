"""Filesystem locations used by MorphServe: the download/conversion cache, the optional offline data mirror and the
repository's own data manifest."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MORPHSERVE_CACHE"
MIRROR_ENV = "MORPHSERVE_DATA_MIRROR"


def cache_dir() -> Path:
    """The cache root: ``$MORPHSERVE_CACHE`` or ``~/.cache/morphserve``; created if missing."""
    raw = os.environ.get(CACHE_ENV)
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "morphserve"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_mirror() -> Path | None:
    """The offline data mirror named by ``$MORPHSERVE_DATA_MIRROR`` (relative paths resolve against the CWD), or
    None when the variable is unset or empty."""
    raw = os.environ.get(MIRROR_ENV)
    if not raw:
        return None
    return Path(raw).expanduser().resolve()


def repo_root() -> Path:
    """The repository root (the folder holding the ``morphserve`` package)."""
    return Path(__file__).resolve().parent.parent


def manifest_path() -> Path:
    """The data manifest listing every external file, ``<repo>/data/manifest.yaml``."""
    return repo_root() / "data" / "manifest.yaml"

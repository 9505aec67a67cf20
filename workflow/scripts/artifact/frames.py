"""Reading the workflow's CSV files (first line ``# provenance: {...}``, then a header) into pandas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from morphserve.harness.records import PROVENANCE_PREFIX

# columns that look numeric but are names
TEXT_COLUMNS = {"load": str, "model": str, "budget": str, "trace": str, "taskset": str, "system": str,
                "task": str, "precisions": str, "target": str, "reason": str}


def read_frame(path: str | Path) -> pd.DataFrame:
    """The table of a CSV written by ``morphserve.harness.records.write_csv`` (empty cells are NaN)."""
    return pd.read_csv(path, skiprows=1, dtype=TEXT_COLUMNS, keep_default_na=True)


def read_provenance(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if not first.startswith(PROVENANCE_PREFIX):
        raise ValueError(f"{path}: first line should start with {PROVENANCE_PREFIX!r}")
    return json.loads(first[len(PROVENANCE_PREFIX):])

"""Token windows cut from task documents: calibration text for choosing orders, held-out text for evaluating them.

:func:`document_windows` takes the first ``seq_len`` tokens of each of the first ``num_windows`` *distinct*
documents of a task pool (:func:`morphserve.workloads.tasks.load_task`; QMSum has several queries per meeting, the
meeting is the document), in file order.  One window per document keeps windows independent, so a bootstrap over
windows is a bootstrap over documents.  Text is tokenized without special tokens; Multi-News's literal
``NEWLINE_CHAR`` markers become newlines first (as in :mod:`morphserve.eval.perplexity`).  A document shorter than
``seq_len`` raises (padding would change what is measured); so does a pool with too few documents.

Which text is which (the pools of :mod:`morphserve.workloads.tasks`):

* calibration (:func:`calibration_windows`): the QMSum **test**-split meeting transcripts, the ``calibration`` pool
  of the ``qmsum`` task, disjoint from every evaluation pool (``load_task`` checks it);
* evaluation: any ``eval`` pool, e.g. Multi-News documents or GovReport reports.

The windows carry their pool, and :mod:`morphserve.importance.orders` refuses to choose an order on windows that
are not from a calibration pool.  Provenance: the source files' sha256 and the sha256 of the token windows
(int32, little-endian, window after window), which every profile and study result records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphserve.data.mirror import sha256_file
from morphserve.workloads.tasks import load_task_report

CALIBRATION_TASK = "qmsum"


@dataclass(frozen=True)
class TokenWindows:
    """Equal-length token windows, one per document, with where they come from."""

    windows: tuple[tuple[int, ...], ...]
    task: str
    pool: str
    documents: tuple[str, ...]  # the example id of each window's document
    files: dict[str, str]  # source file path -> sha256

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    @property
    def seq_len(self) -> int:
        return len(self.windows[0])

    @property
    def tokens_sha256(self) -> str:
        return hashlib.sha256(np.asarray(self.windows, dtype="<i4").tobytes()).hexdigest()

    def tensor(self, first: int = 0, count: int | None = None) -> torch.Tensor:
        """Windows ``first .. first + count - 1`` as a ``[count, seq_len]`` int64 tensor."""
        count = self.num_windows - first if count is None else count
        if not (0 <= first and 1 <= count and first + count <= self.num_windows):
            raise ValueError(f"windows {first}..{first + count - 1} requested, {self.num_windows} available")
        return torch.tensor(self.windows[first:first + count], dtype=torch.int64)

    def head(self, count: int) -> "TokenWindows":
        """The first ``count`` windows."""
        if not 1 <= count <= self.num_windows:
            raise ValueError(f"{count} windows requested, {self.num_windows} available")
        return TokenWindows(self.windows[:count], self.task, self.pool, self.documents[:count], self.files)

    def provenance(self) -> dict[str, Any]:
        return {"task": self.task, "pool": self.pool, "num_windows": self.num_windows, "seq_len": self.seq_len,
                "tokens": self.num_windows * self.seq_len, "tokens_sha256": self.tokens_sha256,
                "files": dict(self.files), "documents": list(self.documents),
                "windows": "first seq_len tokens of each distinct document, file order, no special tokens"}


def _document_text(task: str, context: str) -> str:
    if task == "multi_news":
        return context.replace(" NEWLINE_CHAR ", "\n").replace("NEWLINE_CHAR", "\n")
    return context


def document_windows(tokenizer: Any, task: str, pool: str, num_windows: int, seq_len: int) -> TokenWindows:
    """The first ``seq_len`` tokens of each of the first ``num_windows`` distinct documents of ``task``/``pool``."""
    if num_windows < 1 or seq_len < 2:
        raise ValueError(f"need num_windows >= 1 and seq_len >= 2, got {num_windows}, {seq_len}")
    report = load_task_report(task, pool)  # type: ignore[arg-type]  (load_task_report validates the pool name)
    windows: list[tuple[int, ...]] = []
    documents: list[str] = []
    seen: set[str] = set()
    for ex in report.examples:
        if ex.context in seen:
            continue
        seen.add(ex.context)
        ids = tokenizer(_document_text(task, ex.context), add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            raise ValueError(f"{task}/{pool} document {ex.id} ({ex.source}) has {len(ids)} tokens, fewer than "
                             f"seq_len={seq_len}")
        windows.append(tuple(int(t) for t in ids[:seq_len]))
        documents.append(ex.id)
        if len(windows) == num_windows:
            break
    if len(windows) < num_windows:
        raise ValueError(f"{task}/{pool} has {len(windows)} distinct documents, {num_windows} windows requested")
    files = {f: sha256_file(Path(f)) for f in report.files}
    return TokenWindows(tuple(windows), task, pool, tuple(documents), files)


def calibration_windows(tokenizer: Any, num_windows: int = 16, seq_len: int = 256) -> TokenWindows:
    """Calibration windows: QMSum test-split meetings (the ``qmsum`` calibration pool)."""
    return document_windows(tokenizer, CALIBRATION_TASK, "calibration", num_windows, seq_len)

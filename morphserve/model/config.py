"""Llama-family model configuration and the registry of named architectures.

One dataclass, :class:`ModelConfig`, describes every model the engine serves (Llama-2, Vicuna, Llama-3, CodeLlama,
SmolLM2; MHA and GQA).  It is built from a Hugging Face ``config.json`` (through transformers' ``AutoConfig``) or from
the registry below, which holds the exact published shapes of the paper's models so that synthetic-weight runs have
the real memory footprint and arithmetic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ModelError(ValueError):
    """A model name, checkpoint or configuration that cannot be served."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    # transformers' rope parameters (``rope_type`` plus its fields, e.g. Llama-3.1's "llama3" scaling); the engine
    # computes inverse frequencies through transformers' own ROPE_INIT_FUNCTIONS so every published variant matches.
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    # "llama2" / "llama3": which tokenizer of the data mirror a synthetic-weight model uses.
    tokenizer_family: str | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ModelError(f"model {self.name!r}: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"model {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    # ---- derived shapes -------------------------------------------------------------------------------------
    @property
    def attention(self) -> str:
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_param_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h

    def param_count(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.num_layers * self.layer_param_count() \
            + self.hidden_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config: Any, name: str, tokenizer_family: str | None = None) -> "ModelConfig":
        """Build from a transformers ``LlamaConfig`` (or any config with Llama's field names)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ("llama", "mistral"):
            raise ModelError(f"{name}: model_type {model_type!r} is not a Llama-family architecture")
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ModelError(f"{name}: biased attention/MLP projections are not supported")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ModelError(f"{name}: hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        rope.setdefault("rope_type", "default")
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            name=name,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf_config.max_position_embeddings,
            rope_theta=theta,
            rope_parameters=rope,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            bos_token_id=hf_config.bos_token_id,
            eos_token_ids=eos_ids,
            tokenizer_family=tokenizer_family,
        )

    def to_hf(self) -> Any:
        """The equivalent transformers ``LlamaConfig`` (used for reference models in parity checks)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={**self.rope_parameters, "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        )


# The paper's architectures, with the shapes of their published config.json files.  Synthetic-weight models use
# these; a real checkpoint directory always supplies its own config.
_LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                  num_kv_heads=32, head_dim=128, max_position_embeddings=4096, rope_theta=10000.0,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,), tokenizer_family="llama2")

ARCHITECTURES: dict[str, ModelConfig] = {
    # lmsys/vicuna-7b-v1.5 (a Llama-2-7B fine-tune: identical shapes)
    "vicuna-7b": ModelConfig(name="vicuna-7b", **_LLAMA2_7B),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": ModelConfig(name="llama2-7b", **_LLAMA2_7B),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": ModelConfig(name="llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                             bos_token_id=128000, eos_token_ids=(128001,), tokenizer_family="llama3"),
    # codellama/CodeLlama-34b-hf
    "codellama-34b": ModelConfig(name="codellama-34b", vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                                 num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128,
                                 max_position_embeddings=16384, rope_theta=1000000.0, rms_norm_eps=1e-5,
                                 bos_token_id=1, eos_token_ids=(2,), tokenizer_family="llama2"),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded default; real weights come from its GGUF)
    "smollm2-135m": ModelConfig(name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}

SYNTHETIC_MODELS = ("vicuna-7b", "llama2-7b", "llama3-8b", "codellama-34b")
REAL_MODELS = ("smollm2-135m",)


def architecture(name: str) -> ModelConfig:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(ARCHITECTURES))}, "
                         f"or a path to a Hugging Face checkpoint directory") from None

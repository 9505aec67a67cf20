"""Engine configuration and the device/dtype/KV-capacity decisions derived from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}

CPU_DEFAULT_KV_BYTES = 512 * 2 ** 20
ACTIVATION_RESERVE_BYTES = 2 * 2 ** 30  # kept free on a GPU for activations, logits and the allocator's slack


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # default: float16 on cuda, float32 on cpu (the reference path's parity dtype)
    block_size: int = 16
    # KV capacity, by priority: an explicit block count; a byte size; a whole-device memory budget (weights + KV,
    # e.g. 24e9 to emulate an L4) of which the KV pool gets what the weights and the activation reserve leave;
    # else CPU_DEFAULT_KV_BYTES on CPU or the free device memory minus the reserve on CUDA, both capped at what
    # max_num_seqs sequences of max_model_len tokens could ever use.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    memory_budget_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0  # synthetic weights and default sampling seeds
    # Freeze the warm heap once warm-up is over (LLMEngine.warmed_up; morphserve.engine.heap_freeze), so that no
    # full garbage collection walks it during a step; False leaves the collector alone.
    freeze_heap: bool = True
    # Asynchronous steps: launch step k+1 before reading back step k's tokens (its inputs read them on the device),
    # so the host's scheduling and launch overlap the GPU's work (LLMEngine.step).  Finished requests are then
    # known one step late, and a request that stops on an EOS or stop token computes one token that is discarded.
    # None (the default): on where decode steps replay CUDA graphs (the Triton fast path on CUDA), off elsewhere
    # (on a CPU the model runs synchronously: nothing to overlap).
    async_steps: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {sorted(_DTYPES)}")
        for name in ("num_kv_blocks", "kv_cache_bytes", "memory_budget_bytes", "max_model_len"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not isinstance(self.freeze_heap, bool):
            raise ValueError(f"freeze_heap must be True or False, got {self.freeze_heap!r}")
        if self.async_steps is not None and not isinstance(self.async_steps, bool):
            raise ValueError(f"async_steps must be True, False or None, got {self.async_steps!r}")

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        return dev

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is None:
            return torch.float16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def kv_blocks(self, block_bytes: int, weight_bytes: int, device: torch.device, max_useful: int) -> int:
        """Blocks in the base pool.  Without an explicit count or size, it is what the device (or budget) leaves,
        capped at ``max_useful`` (every sequence slot at full context length): more could never be used."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        if self.kv_cache_bytes is not None:
            nbytes = self.kv_cache_bytes
        elif self.memory_budget_bytes is not None:
            reserve = ACTIVATION_RESERVE_BYTES if device.type == "cuda" else 0
            nbytes = self.memory_budget_bytes - weight_bytes - reserve
            if nbytes < block_bytes:
                raise ValueError(f"memory_budget_bytes={self.memory_budget_bytes} leaves no room for the KV cache "
                                 f"after {weight_bytes} bytes of weights and a {reserve}-byte reserve")
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(free - ACTIVATION_RESERVE_BYTES, max_useful * block_bytes)
        else:
            nbytes = min(CPU_DEFAULT_KV_BYTES, max_useful * block_bytes)
        blocks = nbytes // block_bytes
        if blocks < 1:
            raise ValueError(f"KV cache of {nbytes} bytes holds no block of {block_bytes} bytes")
        return blocks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

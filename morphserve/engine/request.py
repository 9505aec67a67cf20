"""A request's life in the engine: its tokens, KV blocks, status and timestamps, and the record it ends with."""

from __future__ import annotations

import enum
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from morphserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS or stop token was produced
    LENGTH = "length"  # max_tokens reached
    MAX_MODEL_LEN = "max_model_len"  # the context window is full
    ERROR = "error"  # the request was rejected or failed; ``error`` says why
    ABORTED = "aborted"


@dataclass
class RequestMetrics:
    """Timestamps on the engine's clock (``time.monotonic`` seconds unless the engine was given another clock)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def queueing_delay(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(queueing_delay=self.queueing_delay, ttft=self.ttft, tpot=self.tpot, e2e=self.e2e)
        return d


class Request:
    """Engine-side state of one request.  ``token_ids`` holds prompt + generated tokens; ``num_computed_tokens`` of
    them have their K/V in the cache (in ``block_table``).  Preemption by recompute frees the blocks and resets
    ``num_computed_tokens`` to 0: the next schedule re-prefills prompt and generated tokens alike."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                 prompt: str | None = None, device: torch.device | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens a KV-compression policy (baselines.pyramidkv) evicted from the cache in every layer: the cache holds
        # num_computed_tokens - num_evicted_tokens token slots (0 without compression; reset by preemption).
        self.num_evicted_tokens = 0
        self.block_table: list[int] = []
        # Asynchronous steps (EngineConfig.async_steps): while the step that samples this request's next token is in
        # flight, token_ids ends with a placeholder (a negative id, see LLMEngine._step_async) that
        # the next step's input reads on the device; ``last_token_final`` says that token will end the request
        # (its length limit), so it is not scheduled again.
        self.last_token_final = False
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device or "cpu")
            self.generator.manual_seed(params.seed if params.seed is not None else zlib.crc32(request_id.encode()))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens, without a placeholder for a token still being computed."""
        end = len(self.token_ids) - (1 if self.has_placeholder else 0)
        return self.token_ids[self.num_prompt_tokens:end]

    @property
    def has_placeholder(self) -> bool:
        """Whether the last token is still being computed by a step in flight (asynchronous steps)."""
        return len(self.token_ids) > self.num_prompt_tokens and self.token_ids[-1] < 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


@dataclass
class RequestOutput:
    """What a request ends with (or a snapshot while streaming): its tokens, text, finish reason or error, and
    its timestamps.  A rejected request gets one too, with ``finish_reason == "error"`` and ``error`` set."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    error: str | None
    metrics: RequestMetrics

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d

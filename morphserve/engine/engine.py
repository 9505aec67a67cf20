"""The engine loop (control plane): admit requests, schedule a step, run it, sample, finish requests.

:class:`LLMEngine` is synchronous: ``add_request`` then ``step`` until ``has_unfinished()`` is false.  It may be
driven by :class:`morphserve.engine.serving.ServingEngine`, which runs the loop on a thread and accepts requests
while it runs.  Every request ends with a :class:`RequestOutput`: tokens and text, or an error record.

Lifetime: whoever warms the engine up (the harness's replay, a benchmark) calls :meth:`LLMEngine.warmed_up` once
warm-up is over, which freezes the warm heap (:mod:`morphserve.engine.heap_freeze`; ``EngineConfig.freeze_heap``
opts out), and :meth:`LLMEngine.close` when done with the engine, which releases that freeze.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from morphserve.engine import heap_freeze
from morphserve.engine.config import EngineConfig
from morphserve.engine.cuda_graphs import DecodeGraphs
from morphserve.engine.model_runner import ModelRunner
from morphserve.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.scheduler import Scheduler
from morphserve.memory.block_manager import BlockManager
from morphserve.memory.kv_pool import KVPool
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import WeightSource, open_source

# Decode steps a precision map must be steady, under a morphing controller, before its whole-step graph is captured.
FULL_CAPTURE_AFTER = 32


class RequestError(ValueError):
    """A request that cannot be served (empty or oversized prompt, bad parameters...); names the bad value."""


@dataclass
class StepStats:
    step: int
    start: float
    duration: float
    num_tokens: int
    num_seqs: int
    num_preempted: int
    num_waiting: int
    num_running: int
    kv_used_blocks: int
    kv_total_blocks: int


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, source: WeightSource | None = None,
                 clock: Callable[[], float] = time.monotonic, kernels: str | None = None,
                 cuda_graphs: bool | None = None):
        """``kernels``: "triton" (the fast path) or "reference" (pure PyTorch); default Triton on CUDA and the
        reference set on CPU.  ``cuda_graphs``: replay decode steps as CUDA graphs; default on with the Triton
        kernels on CUDA (they need both)."""
        self.config = config = config or EngineConfig()
        self.clock = clock
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.source = source or open_source(config.model, seed=config.seed)
        self.model_config = self.source.config
        self.model = LlamaModel(self.source, self.dtype, self.device, kernels=kernels)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        block_bytes = KVPool.block_nbytes(self.model_config, config.block_size, self.dtype)
        max_useful = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        num_blocks = config.kv_blocks(block_bytes, self.model.weight_bytes(), self.device, max_useful)
        self.pool = KVPool(self.model_config, num_blocks, config.block_size, self.dtype, self.device,
                           max_segment_blocks=self.model.arena.slot_bytes // block_bytes)
        self.block_manager = BlockManager(self.pool)
        self.scheduler = Scheduler(self.block_manager, config.block_size, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        fast = self.model.kernels.name == "triton" and self.device.type == "cuda"
        if cuda_graphs and not fast:
            raise ValueError(f"cuda_graphs=True needs the Triton kernels on CUDA (device {self.device}, kernels "
                             f"{self.model.kernels.name!r})")
        use_graphs = fast if cuda_graphs is None else cuda_graphs
        graphs = None
        if use_graphs:
            graphs = DecodeGraphs(self.model, self.pool, self.model.kernels, config.max_num_seqs,
                                  -(-self.max_model_len // config.block_size))
        self.runner = ModelRunner(self.model, self.pool, graphs=graphs)
        # launch each step before the previous step's tokens are read back (EngineConfig.async_steps)
        self.async_steps = use_graphs if config.async_steps is None else config.async_steps
        self.tokenizer = self.source.tokenizer()
        self.requests: dict[str, Request] = {}
        self.step_stats: deque[StepStats] = deque(maxlen=100_000)
        self._morpher = None
        # A KV-cache policy (e.g. baselines.pyramidkv.PyramidKV), or None: before_forward(sched) runs just before the
        # step's forward; after_forward(sched) once the chunks' num_computed_tokens are advanced and before the
        # sampled tokens are appended and finished requests release their blocks (its time counts in the step).
        self.kv_policy = None
        self._ids = itertools.count()
        self._steps = 0
        self._heap_frozen = False  # this engine holds a heap_freeze reference
        self._inflight = None  # asynchronous steps: the launched step whose tokens are not read back yet

    # ---- lifetime -------------------------------------------------------------------------------------------
    def warmed_up(self) -> bool:
        """Mark the end of warm-up (one-time costs paid: Triton compiles, graph captures, allocator growth): with
        ``config.freeze_heap`` (the default) the garbage is collected and the warm heap frozen, so that no full
        collection walks it during a step (:mod:`morphserve.engine.heap_freeze`).  The engine holds the freeze
        until :meth:`close`; a second call holds nothing more.  Returns whether the engine holds it."""
        if self.config.freeze_heap and not self._heap_frozen:
            heap_freeze.freeze()
            self._heap_frozen = True
        return self._heap_frozen

    def close(self) -> None:
        """Give back what the engine holds process-wide: its reference to the heap freeze (the last one unfreezes
        the heap, so engines built one after another in a process do not keep each other's garbage).  Idempotent;
        the engine stays usable (a later :meth:`warmed_up` freezes again).  An engine dropped without ``close``
        keeps its reference: its own frozen cycles would never be collected to release it."""
        if self._heap_frozen:
            self._heap_frozen = False
            heap_freeze.release()

    @property
    def synthetic_weights(self) -> bool:
        return self.source.synthetic

    # ---- admission ------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; raises RequestError for an empty or malformed prompt."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("empty prompt ''")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise RequestError("empty prompt: no token ids")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary "
                                   f"[0, {self.model_config.vocab_size})")
        else:
            raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return ids

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens does not fit the context window of "
                               f"{self.max_model_len} tokens (at least one position is needed for output)")
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        need = -(-longest // self.config.block_size)
        usable = self.block_manager.num_total_blocks - self.block_manager.base_reserve
        if need > usable:
            raise RequestError(f"request needs {need} KV blocks ({len(ids)} prompt + {params.max_tokens} output "
                               f"tokens) but the pool holds {usable} for sequences")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; raises RequestError (naming the bad value) if it cannot be served."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        ids = self.validate(prompt, params)
        req = Request(request_id, ids, params, self.clock() if arrival_time is None else arrival_time,
                      prompt=prompt if isinstance(prompt, str) else None, device=self.device)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None or req.is_finished:
            return None
        self.scheduler.abort(req)
        return self._finish(req, FinishReason.ABORTED)

    # ---- morphing -------------------------------------------------------------------------------------------
    @property
    def morpher(self):
        """The installed morphing system (:class:`morphserve.engine.morpher.Morpher`), or None."""
        return self._morpher

    @morpher.setter
    def morpher(self, morpher) -> None:
        self._morpher = morpher
        self.runner.hooks = morpher.swapper if morpher is not None else None
        self.runner.after_launch = morpher.after_step if morpher is not None else None
        if self.runner.graphs is not None:
            # a controller moves through transient precision maps: capture a map's whole-step graph only once it
            # has been steady for a while (its steps replay the per-layer graphs until then)
            dynamic = morpher is not None and morpher.controller is not None
            self.runner.graphs.full_capture_after = FULL_CAPTURE_AFTER if dynamic else 0

    def idle_tick(self) -> None:
        """Let the morpher observe an idle engine (so layers are restored once load is gone)."""
        if self._morpher is not None and not self.has_unfinished():
            self._morpher.before_step()
            self._morpher.after_step()
            self._morpher.settle_idle()

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the requests that finished in it (with ``config.async_steps``, the
        requests whose last token the previous iteration's step sampled: see :meth:`_step_async`)."""
        if self.async_steps and self.kv_policy is None:
            return self._step_async()
        finished = self._drain()  # a step still in flight from asynchronous steps (switched off since)
        if finished:
            return finished
        if self._morpher is not None:
            self._morpher.before_step()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            if self._morpher is not None:
                self._morpher.after_step()
            self._check_stalled(sched)
            return []
        start = self.clock()
        self._mark_scheduled(sched, start)
        sampling = [c.request for c in sched.chunks if c.samples]
        if self.kv_policy is not None:
            self.kv_policy.before_forward(sched)
        tokens = self.runner.run(sched)
        for c in sched.chunks:
            c.request.num_computed_tokens += c.num_new_tokens
        if self.kv_policy is not None:
            self.kv_policy.after_forward(sched)
        now = self.clock()
        finished: list[RequestOutput] = []
        for req, tok in zip(sampling, tokens):
            req.token_ids.append(tok)
            finished += self._accept(req, tok, now)
        self._record_step(sched, start, now)
        return finished

    def _mark_scheduled(self, sched, now: float) -> None:
        for c in sched.chunks:
            if c.request.metrics.first_scheduled_time is None:
                c.request.metrics.first_scheduled_time = now

    def _record_step(self, sched, start: float, end: float) -> None:
        self._steps += 1
        self.step_stats.append(StepStats(
            self._steps, start, end - start, sched.num_tokens, len(sched.chunks), len(sched.preempted),
            len(self.scheduler.waiting), len(self.scheduler.running), self.block_manager.num_used,
            self.block_manager.num_total_blocks))

    def _check_stalled(self, sched) -> None:
        """Raise when nothing can run and nothing will change: waiting requests, none running, none preempted."""
        if self.scheduler.waiting and not self.scheduler.running and not sched.preempted:
            raise RuntimeError(f"scheduler stalled: {self.scheduler.waiting[0]!r} cannot be admitted into an "
                               f"idle engine ({self.block_manager.num_free_blocks} free blocks)")

    # ---- asynchronous steps -----------------------------------------------------------------------------------
    def _step_async(self) -> list[RequestOutput]:
        """One iteration with the next step launched before the previous step's tokens are read back.

        1. Schedule step k.  A request whose token from step k-1 is still in flight ends with a placeholder
           ``-(1 + r)``; its decode input reads row ``r`` of step k-1's sampled tokens on the device.
        2. Launch step k (forward and sampling); its tokens stay on the device.
        3. Read back step k-1's tokens (waiting for that step only; step k keeps the GPU busy meanwhile), put them
           in place of the placeholders and finish requests as :meth:`step` does.  A request that stopped on an
           EOS or stop token was also part of step k: its token from step k is discarded and its blocks go back at
           once (work queued later on the same stream runs after step k).
        4. The requests step k samples for get placeholders.  One whose placeholder will be its last token (its
           length limit) is marked so the scheduler leaves it alone; it finishes in the next iteration.

        Greedy tokens are those of synchronous steps at the same batch composition; admission may happen one step
        later, since the blocks of requests that finish in step k-1 are only known after step k is scheduled."""
        if self._morpher is not None:
            self._morpher.before_step()
        start = self.clock()
        sched = self.scheduler.schedule()
        inflight = None
        if sched.chunks:
            self._mark_scheduled(sched, start)
            feed = self._inflight.tokens if self._inflight is not None else None
            inflight = self.runner.launch(sched, feed)
            for c in sched.chunks:
                c.request.num_computed_tokens += c.num_new_tokens
        elif self._morpher is not None:
            self._morpher.after_step()
        finished = self._drain()
        if inflight is not None:
            for row, req in enumerate(inflight.requests):
                if req.is_finished:
                    continue
                req.token_ids.append(-1 - row)
                req.last_token_final = (req.num_output_tokens >= req.params.max_tokens
                                        or req.num_tokens >= self.max_model_len)
            self._inflight = inflight
            self._record_step(sched, start, self.clock())
        elif not finished:
            self._check_stalled(sched)
        return finished

    def _drain(self) -> list[RequestOutput]:
        """Read back the step in flight (asynchronous steps), if any: its tokens replace their placeholders and
        finished requests end.  Returns them."""
        if self._inflight is None:
            return []
        inflight, self._inflight = self._inflight, None
        tokens = inflight.result()
        now = self.clock()
        finished: list[RequestOutput] = []
        for req, tok in zip(inflight.requests, tokens):
            if req.is_finished:  # aborted, or stopped a step earlier (this token is the discarded extra one)
                continue
            req.token_ids[-1] = tok
            req.last_token_final = False
            finished += self._accept(req, tok, now)
        return finished

    def _accept(self, req: Request, tok: int, now: float) -> list[RequestOutput]:
        """Bookkeeping of a token that is now in ``req.token_ids``: timestamps, monitor, stop check.  Returns the
        request's output if it finished."""
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.token_times.append(now)
        if self._morpher is not None:
            self._morpher.monitor.on_token(req)
        reason = self._stop_reason(req, tok)
        if reason is None:
            return []
        self.scheduler.finish(req)
        out = self._finish(req, reason)
        if self._morpher is not None:
            self._morpher.monitor.on_finish(req)
        return [out]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def _stop_reason(self, req: Request, tok: int) -> FinishReason | None:
        p = req.params
        if not p.ignore_eos and (tok in self.model_config.eos_token_ids or tok in p.stop_token_ids):
            return FinishReason.STOP
        if req.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.max_model_len:
            return FinishReason.MAX_MODEL_LEN
        return None

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.metrics.finished_time = self.clock()
        self.requests.pop(req.request_id, None)
        return self.output(req)

    def output(self, req: Request) -> RequestOutput:
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.output_token_ids, text,
                             req.is_finished, req.finish_reason.value if req.finish_reason else None, req.error,
                             req.metrics)

    def error_output(self, request_id: str, prompt: object, error: Exception) -> RequestOutput:
        """The record a rejected request ends with."""
        from morphserve.engine.request import RequestMetrics

        now = self.clock()
        return RequestOutput(str(request_id), prompt if isinstance(prompt, str) else None,
                             list(prompt) if isinstance(prompt, (list, tuple)) else [], [], None, True,
                             FinishReason.ERROR.value, str(error), RequestMetrics(arrival_time=now,
                                                                                  finished_time=now))

    def run_until_done(self) -> list[RequestOutput]:
        out: list[RequestOutput] = []
        while self.has_unfinished():
            out += self.step()
        return out

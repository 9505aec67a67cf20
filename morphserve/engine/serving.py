"""Runs an :class:`LLMEngine` on a background thread and accepts requests while it runs.

``submit`` is thread-safe and returns a ``concurrent.futures.Future`` that resolves to the request's
:class:`RequestOutput`.  A request the engine rejects resolves to an error record (``finish_reason == "error"``);
other requests in flight are unaffected.  If the engine itself fails, every pending future gets the exception:
no request is left without an answer.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from morphserve.engine.engine import LLMEngine, RequestError
from morphserve.engine.request import RequestOutput
from morphserve.engine.sampling_params import SamplingParams


class ServingEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.005):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: dict[str, Future] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self.failure: BaseException | None = None  # what stopped the loop, if the engine failed

    def __enter__(self) -> "ServingEngine":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("serving engine already started")
        self._thread = threading.Thread(target=self._loop, name="morphserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish everything submitted so far, then stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        """True while the engine loop runs."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None, arrival_time: float | None = None) -> Future:
        if self.failure is not None:
            raise RuntimeError(f"serving engine failed: {self.failure!r}") from self.failure
        if not self.alive or self._stop.is_set():
            raise RuntimeError("serving engine is not running")
        fut: Future = Future()
        with self._lock:
            if request_id is None:
                request_id = f"s{self._next_id}"
                self._next_id += 1
        self._inbox.put((prompt, params, request_id, arrival_time, fut))
        return fut

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            prompt, params, rid, arrival, fut = item
            try:
                rid = self.engine.add_request(prompt, params, request_id=rid, arrival_time=arrival)
                self._futures[rid] = fut
            except RequestError as e:
                fut.set_result(self.engine.error_output(rid, prompt, e))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        try:
            while True:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._resolve(out)
                elif self._stop.is_set() and self._inbox.empty():
                    return
                else:
                    self.engine.idle_tick()  # a morphing system restores layers once the load is gone
        except BaseException as e:  # the engine failed: answer every pending request with the failure
            self.failure = e
            for fut in self._futures.values():
                if not fut.done():
                    fut.set_exception(e)
            while not self._inbox.empty():
                self._inbox.get_nowait()[-1].set_exception(e)
            raise

    def _resolve(self, out: RequestOutput) -> None:
        fut = self._futures.pop(out.request_id, None)
        if fut is not None:
            fut.set_result(out)

"""The scheduler: every request of a model goes through it, one caller or many.

`Scheduler` drives a StepEngine. Requests wait in one queue, in order, and are admitted when
fewer than `parallel_sequences` run, the engine has slots for their sequences and the KV
cells they reserve (prompt plus each sequence's new tokens) fit beside those of the running
ones, so no running sequence ever runs out of cache. Each step is one engine call: it
advances every running sequence by one token and feeds the next part of the prompts still
being read (at most `prefill_chunk` tokens of each, `step_tokens` in all), so a long new
prompt does not stall running streams. The logits become tokens in each request's `Search`
(core/search.py). Engines whose sequences must start together (`joins_running = False`:
llama.cpp's encoder-decoder graph) admit a new cohort only when none runs.

With `parallel_sequences` 1 the scheduler runs inline: the thread reading a stream makes the
steps (one request at a time: the prompt in one call, then a token per step). Above 1, a
thread of its own steps, and each request's events reach its reader through a queue (or a
server's event loop, `TokenStream.deliver`).

The waiting queue is the only one: a server bounds it (`max_waiting`) and answers 429 when a
request finds it full (`Overloaded` from `submit`), rather than queueing requests of its own.

`BatchScheduler` drives a BatchEngine (CTranslate2): the waiting requests that share
decoding options run as one engine batch, each stopping on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from pocketlm.converters.core.errors import EngineError, Overloaded, RequestError
from pocketlm.core.constraints import fill_masks
from pocketlm.core.generation import StreamEvent, TokenStream
from pocketlm.core.request import END, Request, Status
from pocketlm.core.search import logprobs_of, make_search

if TYPE_CHECKING:
    import numpy as np

    from pocketlm.core.engine import BatchEngine, Engine, StepEngine
    from pocketlm.core.sequence import Decoding

log = logging.getLogger(__name__)


class Scheduler:
    """Decodes the requests of every caller of one StepEngine together."""

    def __init__(self, engine: StepEngine, prefill_chunk: int | None = 256, step_tokens: int | None = 512):
        self.engine: Engine = engine
        self.inline = engine.parallel_sequences == 1
        if self.inline:  # nothing runs beside the one request: its prompt goes in one call
            prefill_chunk = step_tokens = None
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        self.max_waiting: int | None = None  # requests beyond the running places that may wait
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._cancels = False  # a request was cancelled since the last step
        self._thread: threading.Thread | None = None
        self.steps = 0  # engine calls made (for tests and reports)

    # -- callers ----------------------------------------------------------------------------
    def request(self, first: Decoding, cohort: int = 1) -> Request:
        """A request for a checked first sequence (errors come from the call, not the stream)."""
        engine: StepEngine = self.engine  # type: ignore[assignment]
        search = make_search(engine, first, max(engine.budget(len(first.ids), first.options.max_new_tokens), 0))
        n = len(search.seqs)
        if n > engine.sequence_slots:
            raise RequestError(f"{n} sequences asked for one prompt; this model holds {engine.sequence_slots}")
        if search.reserve > engine.kv_cells:
            raise RequestError(
                f"{n} sequences of up to {search.budget} new tokens after a {len(first.ids)}-token prompt need "
                f"{search.reserve} KV cache cells; the model holds {engine.kv_cells} "
                "(load with a larger kv_cells, or ask fewer sequences or tokens)"
            )
        return Request(first, search.budget, search, cohort)

    def submit(self, requests: list[Request]) -> list[TokenStream]:
        """Queue requests (in order) and return their streams. `Overloaded` when more than
        `max_waiting` requests would wait for a place among the `parallel_sequences` running."""
        with self._wake:
            if self._closed:
                raise EngineError("the model is closed")
            if self.max_waiting is not None:
                places = max(self.engine.parallel_sequences - len(self._running), 0)
                if len(self._waiting) + len(requests) > self.max_waiting + places:
                    raise Overloaded(
                        f"{len(self._waiting)} requests are waiting for {self.engine.parallel_sequences} "
                        f"running places; at most {self.max_waiting} may wait"
                    )
            for request in requests:
                if request.budget == 0:  # nothing to generate: done at once
                    tail = request.first.finish()
                    for item in ([tail] if tail else []) + [END]:
                        request.events.put(item)
                    request.status = Status.FINISHED
                else:
                    self._waiting.append(request)
            if not self.inline:
                self._start_thread()
            self._wake.notify_all()
        return [self._stream(r) for r in requests]

    def _stream(self, request: Request) -> TokenStream:
        if self.inline:
            return TokenStream(self._inline_events(request), request.result, on_cancel=lambda: self.cancel(request))

        def deliver(sink: Any) -> None:
            request.events.divert(lambda item: sink(None if item is END else item))

        return TokenStream(
            self._queued_events(request), request.result, on_cancel=lambda: self.cancel(request), on_deliver=deliver
        )

    @property
    def load(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        with self._wake:
            return len(self._running), len(self._waiting)

    @property
    def sequences_running(self) -> int:
        """Sequences of the running requests (samples and beams count one each)."""
        with self._wake:
            return sum(r.sequences for r in self._running)

    def close(self) -> None:
        """Stop: running and waiting requests end with an error; the thread exits."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:
            with self.engine.lock:
                self._fail_all(EngineError("the model was closed"))

    def cancel(self, request: Request) -> None:
        """From any thread: the request ends at the next step (its reader sees the end)."""
        with self._wake:
            request.cancel()
            self._cancels = True
            self._wake.notify_all()

    # -- a request's events -----------------------------------------------------------------
    @staticmethod
    def _item(item: Any) -> StreamEvent | None:
        if isinstance(item, BaseException):
            raise item
        return None if item is END else item

    def _queued_events(self, request: Request) -> Generator[StreamEvent, None, None]:
        try:
            while True:
                event = self._item(request.events.queue.get())
                if event is None:
                    return
                yield event
        finally:
            if not request.finished:
                self.cancel(request)

    def _inline_events(self, request: Request) -> Generator[StreamEvent, None, None]:
        """The reader's thread steps the scheduler until its request's events are there."""
        events = request.events.queue
        try:
            while True:
                while events.empty():
                    self._step_inline(request)
                item = events.get_nowait()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.finished:  # the reader stopped: free the engine now
                with self.engine.lock:
                    self._finish(request, Status.CANCELLED)

    def _step_inline(self, request: Request) -> None:
        engine = self.engine
        with engine.lock:
            if request.finished or not request.events.queue.empty():
                return
            if self._closed:
                self._fail_all(EngineError("the model was closed"))
                return
            if not self._safe_step() and not request.finished:
                engine.freed.wait(0.05)  # type: ignore[attr-defined]  # nothing to do yet: another reader's turn

    # -- the loop ---------------------------------------------------------------------------
    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pocketlm-scheduler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._running and not self._waiting:
                    self._wake.wait()
                if self._closed:
                    break
                self._gather()
            with self.engine.lock:
                self._safe_step()
        with self.engine.lock:
            self._fail_all(EngineError("the model was closed"))

    def _safe_step(self) -> bool:
        """One step; if the engine fails, every running request fails with its error."""
        try:
            return self._step()
        except BaseException as e:  # the engine failed: every running sequence is lost
            log.debug("scheduler step failed: %s", e)
            for request in list(self._running):
                self._finish(request, Status.FAILED, e)
            return True

    def _fail_all(self, error: BaseException) -> None:
        for request in list(self._running) + list(self._waiting):
            self._finish(request, Status.FAILED, error)

    def _gather(self) -> None:
        """Called holding `_wake` (not the engine) before each step: a chance to wait for more."""

    def _drop_cancelled(self) -> None:
        if not self._cancels:
            return
        self._cancels = False
        for request in [r for r in self._running if r.cancel_requested]:
            self._finish(request, Status.CANCELLED)
        for request in [r for r in self._waiting if r.cancel_requested]:
            self._finish(request, Status.CANCELLED)

    def _admit_waiting(self) -> None:
        """Admit waiting requests, in order, while a slot and their KV cells are free."""
        engine: StepEngine = self.engine  # type: ignore[assignment]
        cohort_open = engine.joins_running or not self._running
        while self._waiting and cohort_open and len(self._running) < engine.parallel_sequences:
            request = self._waiting[0]
            if not engine.can_admit(request.reserve, request.first, request.sequences):
                break
            self._waiting.popleft()
            assert request.search is not None
            request.status = Status.RUNNING
            try:
                request.search.admit()
            except Exception as e:  # this request fails, not the others
                self._finish(request, Status.FAILED, e)
                continue
            self._running.append(request)

    def _step(self) -> bool:
        """One engine call for every running request; whether there was anything to do."""
        with self._wake:
            if self._cancels:
                self._drop_cancelled()
            if self._waiting:
                self._admit_waiting()
            running = list(self._running)
        # each request's work: its sequences' next tokens, or the next part of its prompt
        plans = [request.search.decode() for request in running]  # type: ignore[union-attr]
        room = None if self.step_tokens is None else self.step_tokens - sum(map(len, plans))
        joins = self.engine.joins_running  # type: ignore[attr-defined]
        for request, plan in zip(running, plans):  # prompts take what room the decoding leaves
            if plan:
                continue
            chunk = None if room is None or not joins else min(self.prefill_chunk or room, room)
            part = request.search.prefill(chunk)  # type: ignore[union-attr]
            if part is not None:
                plan.append(part)
                if room is not None:
                    room -= len(part[1])
        work = [entry for plan in plans for entry in plan]
        if not work:
            return False
        guides = [g for request in running for g in request.search.guides()]  # type: ignore[union-attr]
        if guides:  # every constrained sequence's mask in one call
            fill_masks(guides)
        outputs = iter(self.engine.evaluate(work))  # type: ignore[attr-defined]
        self.steps += 1
        for request, plan in zip(running, plans):
            if plan:
                self._accept(request, [(seq, next(outputs)) for seq, _, _ in plan])
        return True

    def _accept(self, request: Request, outputs: list[tuple[Decoding, np.ndarray | None]]) -> None:
        """A request's logits came back: its search turns them into tokens and events."""
        search = request.search
        assert search is not None
        search.accept(outputs)
        request.events.put_all(search.events())
        if search.done:
            self._finish(request, Status.FINISHED)

    def _finish(self, request: Request, status: Status, error: BaseException | None = None) -> None:
        if request.finished:
            return
        search = request.search
        if error is None:
            if search is None:
                tail = request.first.finish()
                if tail is not None:
                    request.events.put(tail)
            elif not search.done:  # cancelled: what is held back still goes out
                for seq in search.seqs:
                    if not seq.done:
                        seq.finish()
        with self._wake:
            if request in self._running:
                self._running.remove(request)
            if request in self._waiting:
                self._waiting.remove(request)
        request.status = status
        if search is not None:
            search.close()
        request.events.put(error if error is not None else END)


class BatchScheduler(Scheduler):
    """Forms the batches of a BatchEngine (CTranslate2).

    When the engine is free, the waiting requests that share decoding options (up to
    `parallel_sequences`, or all those submitted together) run as one batch; each streams
    through the engine's per-token callback and stops on its own (end, stop string, budget,
    or its caller going away). Requests arriving meanwhile form the next batch; before a
    batch that is not full starts, `window` seconds are waited for more. 5 ms measured best
    (flan-t5-small int8, 2 threads, 16 clients at once: 333 tokens/s against 257 without a
    window and 305-322 with 20-50 ms; benchmarks/README.md), and costs a lone request 5 ms.
    Requests the engine decodes whole (`batch_key` None: beams, several samples,
    log-probabilities) run alone."""

    window = 0.005

    def __init__(self, engine: BatchEngine):
        super().__init__(engine)  # type: ignore[arg-type]
        self.inline = False  # the engine streams from its own call: a thread makes it

    def request(self, first: Decoding, cohort: int = 1) -> Request:
        return Request(first, max(self.engine.budget(len(first.ids), first.options.max_new_tokens), 0), cohort=cohort)

    def _gather(self) -> None:
        parallel = self.engine.parallel_sequences
        if self.window and self._waiting and len(self._waiting) < parallel:
            deadline = time.monotonic() + self.window
            while len(self._waiting) < parallel and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._wake.wait(left):
                    break

    def _step(self) -> bool:
        engine: BatchEngine = self.engine  # type: ignore[assignment]
        with self._wake:
            self._drop_cancelled()
            if not self._waiting:
                return False
            key = engine.batch_key(self._waiting[0].first.options)
            if key is None:
                group = [self._waiting[0]]
            else:
                cap = max(engine.parallel_sequences, self._waiting[0].cohort)
                group = [r for r in self._waiting if engine.batch_key(r.first.options) == key][:cap]
            for request in group:
                self._waiting.remove(request)
                self._running.append(request)
                request.status = Status.RUNNING

        def on_token(i: int, token: int) -> bool:
            request = group[i]
            if request.finished:
                return True
            if request.cancel_requested:
                self._finish(request, Status.CANCELLED)
                return True
            return self._push(request, token)

        self.steps += 1
        if key is None:
            self._decode_group(group[0])
        else:
            engine.decode_batch([r.first for r in group], [r.budget for r in group], on_token)
        for request in group:
            self._finish(request, Status.CANCELLED if request.cancel_requested else Status.FINISHED)
        return True

    def _push(self, request: Request, token: int) -> bool:
        """Hand out a sequence's new token; whether that finished it (end, stop string, budget)."""
        seq = request.first
        request.generated += 1
        event = seq.push(token)
        if event is not None:
            request.events.put(event)
        if seq.done or request.generated >= request.budget:
            self._finish(request, Status.FINISHED)
            return True
        return False

    def _decode_group(self, request: Request) -> None:
        """Decode a request whole, then hand out each sequence's events (`index` says whose);
        log-probabilities are computed afterwards, teacher-forced, so they are the model's own."""
        engine: BatchEngine = self.engine  # type: ignore[assignment]
        seq, o = request.first, request.first.options
        seq.started = time.perf_counter()
        empty: list[tuple[list[int], float | None]] = [([], None)] * o.num_return_sequences
        hypotheses = engine.decode_group(seq, request.budget) if request.budget > 0 else empty
        logprobs: list[Any] = [None] * len(hypotheses)
        if o.logprobs is not None:
            asked = [tokens for tokens, _ in hypotheses if tokens]
            rows: Iterator[Any] = iter(engine.continuations_logits(seq.ids, asked) if asked else [])
            logprobs = [logprobs_of(next(rows), t, o.logprobs) if t else [] for t, _ in hypotheses]
        results = []
        for i, ((tokens, score), lps) in enumerate(zip(hypotheses, logprobs)):
            d = seq if i == 0 else seq.sibling(i, engine.detokenizer(), engine.penalty_history(seq.ids))
            d.started = seq.started
            for event in d.render(tokens, lps):
                if request.cancel_requested:
                    break
                request.events.put(event)
            d.result.score = score
            results.append(d.result)
        seq.result.others = results[1:]

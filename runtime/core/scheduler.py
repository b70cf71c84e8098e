"""Continuous batching: one StepModel decoding many sequences together.

Requests join between engine steps. Each step is one call to the engine: it advances every
running sequence by one token and feeds the next part of the prompts still being read (at
most `prefill_chunk` tokens of each, `step_tokens` in all), so a long new prompt does not
stall running streams for the whole of its prefill. Every sequence keeps its own options,
sampler, stop strings and budget; its events reach the caller through a queue. A caller that
closes its stream (a client that went away) frees the sequence's slot at the next step.

A request is a `Search` (runtime/core/search.py): one sequence usually, or its samples or beams,
each a sequence of the engine's cache (`model.sequence_slots` in all). It is admitted when
fewer than `parallel_sequences` requests run, slots are free for its sequences and the KV
cells it reserves (prompt plus each sequence's new tokens) fit next to those of the running
ones, so no running sequence ever runs out of cache; until then it waits, in order. Models
whose sequences must start together (`joins_running = False`: llama.cpp's encoder-decoder
graph) admit a new cohort only when none runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from pocketlm.core.generation import GenerationOptions, GenerationResult, StreamEvent, TokenStream

if TYPE_CHECKING:
    import numpy as np

    from pocketlm.core.model import Decoding, Prompt, StepModel
    from pocketlm.core.search import Search

log = logging.getLogger(__name__)

_END = object()  # the last item of a request's queue


class _Events:
    """A request's events on their way to its reader: a queue its stream reads, or, once
    `divert`ed, a function the scheduler's thread calls with each (a server's event loop)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sink: Any = None
        self._lock = threading.Lock()

    def put(self, item: Any) -> None:
        with self._lock:
            if self._sink is None:
                self._queue.put(item)
                return
        self._sink(item)

    def get(self) -> Any:
        return self._queue.get()

    def divert(self, sink: Any) -> None:
        """From now on hand every item to `sink` (those already queued first, in order)."""
        with self._lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                sink(item)
            self._sink = sink


class _Request:
    """A request in the scheduler: its sequences' Search (or, for engines that decode batches
    by themselves, its Decoding and budget), and the queue of its events."""

    def __init__(self, seq: Decoding, budget: int, reserve: int, search: Search | None = None):
        self.seq, self.budget, self.reserve, self.search = seq, budget, reserve, search
        self.events = _Events()
        self.cancelled = False
        self.finished = False
        self.admitted = False
        self.generated = 0

    @property
    def sequences(self) -> int:
        return len(self.search.seqs) if self.search is not None else 1


class Scheduler:
    """Decodes the sequences of many callers together on one model (`model.scheduler`)."""

    def __init__(self, model: StepModel, prefill_chunk: int = 256, step_tokens: int = 512):
        self.model = model
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # engine calls made (for tests and reports)

    # -- callers ----------------------------------------------------------------------------
    def stream_tokens(self, prompt: Prompt, options: GenerationOptions | None = None, /, **kwargs: Any) -> TokenStream:
        """As `Model.stream_tokens`: the prompt is checked now; tokens come as the scheduler
        decodes them together with everything else running."""
        return self._submit([prompt], GenerationOptions.of(options, **kwargs))[0]

    def generate_batch(self, prompts: list[Prompt], options: GenerationOptions | None = None) -> list[GenerationResult]:
        """All prompts submitted at once (so they can start together), decoded as slots allow."""
        streams = self._submit(prompts, options or GenerationOptions())
        for stream in streams:
            for _ in stream:
                pass
        return [stream.result for stream in streams]

    def _request(self, prompt: Prompt, options: GenerationOptions) -> _Request:
        search = self.model._search(prompt, options)
        return _Request(search.first, search.budget, search.reserve, search)

    def _submit(self, prompts: list[Prompt], options: GenerationOptions) -> list[TokenStream]:
        requests = [self._request(prompt, options) for prompt in prompts]
        with self._wake:
            if self._closed:
                from pocketlm.converters.core.errors import GenerationError

                raise GenerationError("the model is closed")
            for request in requests:
                if request.budget == 0:  # nothing to generate: done at once
                    tail = request.seq.finish()
                    for item in ([tail] if tail else []) + [_END]:
                        request.events.put(item)
                    request.finished = True
                else:
                    self._waiting.append(request)
            self._start_thread()
            self._wake.notify_all()
        return [
            TokenStream(
                self._events(r),
                r.seq.result,
                on_cancel=lambda r=r: self._cancel(r),
                on_deliver=lambda sink, r=r: r.events.divert(lambda item: sink(None if item is _END else item)),
            )
            for r in requests
        ]

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

    def _cancel(self, request: _Request) -> None:
        """From any thread: the request ends at the next step (its reader sees the end)."""
        with self._wake:
            if not request.finished:
                request.cancelled = True
                self._wake.notify_all()

    def _events(self, request: _Request) -> Generator[StreamEvent, None, None]:
        try:
            while True:
                item = request.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.finished:
                with self._wake:
                    request.cancelled = True
                    self._wake.notify_all()

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
            with self.model._lock:
                try:
                    self._step()
                except BaseException as e:  # the engine failed: every running sequence is lost
                    log.debug("scheduler step failed: %s", e)
                    for request in list(self._running):
                        self._finish(request, error=e)
        from pocketlm.converters.core.errors import GenerationError

        with self.model._lock:
            for request in list(self._running) + list(self._waiting):
                self._finish(request, error=GenerationError("the model was closed"))

    def _drop_cancelled_waiting(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.finished = True
            request.events.put(_END)  # a reader cancelling from another thread may be waiting

    def _gather(self) -> None:
        """Called holding `_wake` (not the engine) before each step: a chance to wait for more."""

    def _admit_waiting(self) -> None:
        """Admit waiting requests, in order, while a slot and their KV cells are free."""
        model = self.model
        cohort_open = model.joins_running or not self._running
        while self._waiting and cohort_open and len(self._running) < model.parallel_sequences:
            request = self._waiting[0]
            if not model._can_admit(request.reserve, request.seq, request.sequences):
                break
            self._waiting.popleft()
            assert request.search is not None
            try:
                model._admit_search(request.search)
            except Exception as e:  # this request fails, not the others
                self._finish(request, error=e)
                continue
            request.admitted = True
            self._running.append(request)

    def _step(self) -> None:
        model = self.model
        with self._wake:
            for request in [r for r in self._running if r.cancelled]:
                self._finish(request)
            self._drop_cancelled_waiting()
            self._admit_waiting()
            running = list(self._running)
        work: list[tuple[Decoding, list[int], bool]] = []
        owners: list[_Request] = []
        room = self.step_tokens
        for request in running:  # every running sequence's next token first
            assert request.search is not None
            entries = request.search.decode()
            work += entries
            owners += [request] * len(entries)
            room -= len(entries)
        for request in running:  # then the prompts still being read, in chunks
            assert request.search is not None
            part = request.search.prefill(min(self.prefill_chunk, room) if model.joins_running else None)
            if part is not None:
                work.append(part)
                owners.append(request)
                room -= len(part[1])
        if not work:
            return
        outputs = model._evaluate(work)
        self.steps += 1
        grouped: dict[int, list[tuple[Decoding, np.ndarray | None]]] = {}
        for request, (seq, _, _), logits in zip(owners, work, outputs):
            grouped.setdefault(id(request), []).append((seq, logits))
        for request in running:
            if id(request) in grouped:
                self._accept(request, grouped[id(request)])

    def _accept(self, request: _Request, outputs: list[tuple[Decoding, np.ndarray | None]]) -> None:
        """A request's logits came back: its search turns them into tokens and events."""
        search = request.search
        assert search is not None
        search.accept(outputs)
        for event in search.events():
            request.events.put(event)
        if search.done:
            self._finish(request)

    def _push(self, request: _Request, token: int) -> bool:
        """Hand out a sequence's new token; whether that finished it (end, stop string, budget)."""
        seq = request.seq
        request.generated += 1
        event = seq.push(token, self.model._is_end(token))
        if event is not None:
            request.events.put(event)
        if seq.done or request.generated >= request.budget:
            self._finish(request)
            return True
        return False

    def _finish(self, request: _Request, error: BaseException | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        search = request.search
        if error is None:
            if search is None:
                tail = request.seq.finish()
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
        if request.admitted:
            if search is not None:
                search.close()
            else:
                self.model._release(request.seq)
        request.events.put(error if error is not None else _END)


class EngineBatches(Scheduler):
    """For engines that decode a whole batch by themselves (CTranslate2).

    When the engine is free, the waiting requests that share decoding options (up to
    `parallel_sequences`) run as one batch; each streams through the engine's per-token
    callback and stops on its own (end, stop string, budget, or its caller going away).
    Requests arriving meanwhile form the next batch; before a batch that is not full starts,
    `window` seconds are waited for more. 5 ms measured best (flan-t5-small int8, 2 threads, 16
    clients at once: 333 tokens/s against 257 without a window and 305-322 with 20-50 ms;
    benchmarks/README.md), and costs a lone request 5 ms. The model provides
    `_batch_key(options)` and `_decode_batch(seqs, budgets, on_token)`."""

    window = 0.005

    def _request(self, prompt: Prompt, options: GenerationOptions) -> _Request:
        seq = self.model._decoding(prompt, options)
        return _Request(seq, max(self.model._budget(len(seq.ids), options.max_new_tokens), 0), 0)

    def _gather(self) -> None:
        if self.window and self._waiting and len(self._waiting) < self.model.parallel_sequences:
            deadline = time.monotonic() + self.window
            while len(self._waiting) < self.model.parallel_sequences and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._wake.wait(left):
                    break

    def _step(self) -> None:
        model = self.model
        with self._wake:
            self._drop_cancelled_waiting()
            if not self._waiting:
                return
            key = model._batch_key(self._waiting[0].seq.options)
            group = [r for r in self._waiting if model._batch_key(r.seq.options) == key]
            group = group[: model.parallel_sequences]
            for request in group:
                self._waiting.remove(request)
                self._running.append(request)

        def on_token(i: int, token: int) -> bool:
            request = group[i]
            if request.finished:
                return True
            if request.cancelled:
                self._finish(request)
                return True
            return self._push(request, token)

        self.steps += 1
        if model._is_group(group[0].seq.options):  # several sequences of one prompt: alone
            request = group[0]
            for event in model._group_events(request.seq, request.budget):
                if request.cancelled:
                    break
                request.events.put(event)
        else:
            model._decode_batch([r.seq for r in group], [r.budget for r in group], on_token)
        for request in group:
            self._finish(request)

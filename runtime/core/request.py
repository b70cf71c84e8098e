"""A caller's request on its way through the scheduler: its status, its sequences, its events.

A request is WAITING until the scheduler admits it, RUNNING while its sequences decode, and
then FINISHED, CANCELLED (its caller went away or closed the stream) or FAILED (the engine
failed; its reader gets the error). `cancel()` may be called from any thread: the scheduler
acts on it at its next step.
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pocketlm.core.generation import GenerationResult
    from pocketlm.core.search import Search
    from pocketlm.core.sequence import Decoding

END = object()  # the last item of a request's events


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


ENDED = (Status.FINISHED, Status.CANCELLED, Status.FAILED)


class Events:
    """A request's events on their way to its reader: a queue its stream reads, or, once
    `divert`ed, a function the scheduler's thread calls with each (a server's event loop)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sink: Callable[[Any], None] | None = None
        self.lock = threading.Lock()

    def put(self, item: Any) -> None:
        with self.lock:
            if self.sink is None:
                self.queue.put(item)
                return
        self.sink(item)

    def divert(self, sink: Callable[[Any], None]) -> None:
        """From now on hand every item to `sink` (those already queued first, in order)."""
        with self.lock:
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                sink(item)
            self.sink = sink

    def put_all(self, items: list[Any]) -> None:
        """`put` each item, in order."""
        with self.lock:
            if self.sink is None:
                for item in items:
                    self.queue.put(item)
                return
        for item in items:
            self.sink(item)


class Request:
    """One prompt's generation: its first sequence (and, on a step engine, the `search` that
    decodes all of its sequences), its budget of new tokens, the KV cells it reserves, its
    status and its events. `cohort` is how many requests were submitted with it (a batch
    engine may decode them in one batch)."""

    def __init__(self, first: Decoding, budget: int, search: Search | None = None, cohort: int = 1):
        self.first, self.budget, self.search, self.cohort = first, budget, search, cohort
        self.reserve = search.reserve if search is not None else 0
        self.finished = False  # FINISHED, CANCELLED or FAILED (kept with `status`: read every step)
        self.status = Status.WAITING
        self.cancel_requested = False
        self.generated = 0  # tokens handed out (batch engines)
        self.events = Events()

    @property
    def result(self) -> GenerationResult:
        return self.first.result

    @property
    def sequences(self) -> int:
        """Sequences of the engine's cache it takes (its samples or beams)."""
        return len(self.search.seqs) if self.search is not None else 1

    @property
    def status(self) -> Status:
        return self._status

    @status.setter
    def status(self, status: Status) -> None:
        self._status = status
        self.finished = status in ENDED

    def cancel(self) -> None:
        """Ask the scheduler to stop this request at its next step (any thread)."""
        if not self.finished:
            self.cancel_requested = True

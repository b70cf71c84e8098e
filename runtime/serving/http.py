"""The OpenAI-compatible server on a socket: runtime/serving/app.py's service on uvicorn.

    server = make_server(pocketlm.load("bloomz-560m-q4_k_m.gguf"), port=8000)
    server.serve_forever()   # or serve(model): blocking; SIGTERM or Ctrl-C stop it gracefully

Connections cost no thread. They are capped (`max_connections`, by default what the open-file
limit leaves): at the cap a new connection replaces the one that has waited longest for a
request, or is refused with a 503 and closed when none has waited a second. A request's
headers must arrive within `Timeouts.header` seconds of connecting (or of the previous
response); an idle connection is kept `Timeouts.keep_alive` seconds.

Shutdown (SIGTERM or SIGINT, or `shutdown()`): no new connections or requests (503), running
generations may finish within `Timeouts.drain` seconds; then they are cut (see app.py: streams
end with `finish_reason: "abort"` and `[DONE]`), and the server returns. A second signal cuts
at once.

An address that is taken or invalid is refused before the model loads (`check_address`). Bound
to a loopback address, the service answers only loopback Host names; an open address without
an API key is warned about at start (`start_warnings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pocketlm.converters.core import __version__
from pocketlm.converters.core.errors import PocketLMError
from pocketlm.core.model import Model
from pocketlm.serving.app import Limits, Service, Timeouts, is_loopback, make_app
from pocketlm.serving.openai_api import ApiError

__all__ = [
    "Limits",
    "Server",
    "Timeouts",
    "check_address",
    "default_max_connections",
    "make_server",
    "serve",
    "start_warnings",
]

log = logging.getLogger("pocketlm.server")

RESERVED_FDS = 64  # file descriptors kept for the model, the engine and the process itself
MIN_WAIT_TO_EVICT = 1.0  # seconds a connection must have waited for a request before it can be replaced


class Connections:
    """Every open connection, and those waiting for a request (just connected, or idle between
    requests), oldest first: the connection cap replaces the one that has waited longest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: set[Connection] = set()
        self.waiting: dict[Connection, float] = {}  # insertion order = since when
        self.refused = self.replaced = self.timed_out = 0

    def admit(self, conn: Connection) -> bool:
        now = time.monotonic()
        if len(self.open) >= self.limit:
            oldest = next(iter(self.waiting), None)
            if oldest is None or now - self.waiting[oldest] < MIN_WAIT_TO_EVICT:
                self.refused += 1
                return False
            self.replaced += 1
            oldest.drop()
        self.open.add(conn)
        self.waiting[conn] = now
        return True

    def busy(self, conn: Connection) -> None:
        self.waiting.pop(conn, None)

    def idle(self, conn: Connection) -> None:
        self.waiting.pop(conn, None)
        self.waiting[conn] = time.monotonic()

    def remove(self, conn: Connection) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)


_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class Connection(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with PocketLM's connection cap and header deadline."""

    def __init__(self, *args: Any, connections: Connections, timeouts: Timeouts, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._connections, self._timeouts = connections, timeouts
        self._deadline: asyncio.TimerHandle | None = None
        self._seen: Any = None  # the request/response cycle last seen starting

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._connections.admit(self):
            body = json.dumps(
                ApiError(
                    503, "too many connections; retry shortly", type="server_error", code="too_many_connections"
                ).body()
            ).encode()
            transport.write(_REFUSAL % (len(body), body))
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._timeouts.header, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self in self._connections.waiting:
            self._connections.timed_out += 1
            self.drop()

    def drop(self) -> None:
        """Close now, without waiting to send anything (the client sent no whole request)."""
        self._connections.remove(self)
        self._disarm()
        self.transport.abort()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen:  # a request's headers are in
            self._seen = self.cycle
            self.scope["pocketlm.connection"] = self  # type: ignore[typeddict-unknown-key]
            self._connections.busy(self)
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._connections.idle(self)
            self._arm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.remove(self)
        self._disarm()
        super().connection_lost(exc)


def default_max_connections() -> int:
    """What the open-file limit leaves for connections: the limit, less what the process and
    engine hold and one accept burst (the listen backlog) of connections being replaced."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(8, min(soft, 65536) - RESERVED_FDS - BACKLOG)


BACKLOG = 128  # listen backlog, and the most connections asyncio accepts in one go


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, with PocketLM's drain: signals start it, the deadline cuts streams."""

    def __init__(self, config: uvicorn.Config, owner: Server):
        super().__init__(config)
        self.owner = owner

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self.owner._abort_now:  # a third: stop waiting for anything
            self.force_exit = True
        elif self.should_exit:  # a second signal: cut running generations now
            self.owner._abort_soon()
        else:
            self.owner.stop_reason = signal.Signals(sig).name
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.owner.on_ready is not None:  # listening, signals handled: say so
            self.owner.on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        owner = self.owner
        owner.service.begin_drain()
        loop = asyncio.get_running_loop()
        owner._loop = loop
        drain = owner.drain if owner.drain is not None else owner.service.timeouts.drain
        timer = loop.call_later(drain, owner.service.abort)
        if owner._abort_now:
            owner.service.abort()
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


class Server:
    """One model behind the OpenAI API on a socket. Use `make_server()`; `serve_forever()`
    blocks until `shutdown()` (from another thread), SIGTERM or SIGINT."""

    def __init__(
        self,
        service: Service,
        host: str,
        port: int,
        max_connections: int | None = None,
        timeouts: Timeouts | None = None,
    ):
        self.service = service
        self.model, self.model_name = service.model, service.model_name
        self.parallel = service.parallel
        self.timeouts = timeouts or service.timeouts
        self.connections = Connections(max_connections or default_max_connections())
        self.stop_reason = ""
        self.on_ready: Callable[[], None] | None = None  # called once it listens and handles signals
        self.drain: float | None = None
        self._abort_now = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished = threading.Event()
        self._serving = False
        check_port(port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            raise _cannot_listen(host, port, e) from None
        sock.setblocking(False)
        self.socket = sock
        self.host = host
        if is_loopback(host):
            service.loopback_port = self.port
        config = uvicorn.Config(
            service,
            http=functools.partial(Connection, connections=self.connections, timeouts=self.timeouts),  # type: ignore[arg-type]
            loop="asyncio",
            lifespan="off",
            proxy_headers=False,
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("server", f"pocketlm/{__version__}")],
            backlog=BACKLOG,
            timeout_keep_alive=int(max(1, self.timeouts.keep_alive)),
            timeout_graceful_shutdown=int(self.timeouts.drain + 5),
            h11_max_incomplete_event_size=64 * 1024,
        )
        self._uvicorn = _Uvicorn(config, self)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = str(self.socket.getsockname()[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def describe(self) -> str:
        """The start line's details: how many requests are decoded together, the KV budget."""
        info = self.model.info
        kv = f", KV cache {info.kv_cells} tokens" if info.kv_cells else ""
        return f"parallel {self.parallel}{kv}, queue {self.service.max_queue}"

    def serve_forever(self) -> None:
        """Serve until shutdown; running generations drain first (see the module docstring)."""
        self._serving = True
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.socket]))
        finally:
            self.service.join_generations(self.timeouts.drain)
            self._serving = False
            self._finished.set()

    def shutdown(self, drain: float | None = None) -> None:
        """Stop (from another thread): no new requests; running generations get `drain` seconds
        (default `Timeouts.drain`); then they are cut, and serve_forever returns."""
        self.drain = drain
        self._uvicorn.should_exit = True
        if self._serving:
            self._finished.wait()
        else:
            self.socket.close()

    def _abort_soon(self) -> None:
        self._abort_now = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.service.abort)


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise PocketLMError(f"port {port}: must be 0-65535 (0 picks a free one)")


def check_address(host: str, port: int) -> None:
    """Refuse a bad or taken address before the model is loaded."""
    check_port(port)
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise _cannot_listen(host, port, e) from None


def _cannot_listen(host: str, port: int, e: OSError) -> PocketLMError:
    hint = " (another program listens there: choose another --port)" if e.errno == errno.EADDRINUSE else ""
    return PocketLMError(f"cannot listen on {host} port {port}: {e.strerror or e}{hint}")


def make_server(
    model: Model,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    max_body_bytes: int | None = None,
    model_name: str | None = None,
    cors_origins: Sequence[str] = (),
    limits: Limits | None = None,
    timeouts: Timeouts | None = None,
    max_connections: int | None = None,
) -> Server:
    """A bound server (port 0 picks a free one: see `.port`, `.url`); call `.serve_forever()`.

    As many generations run at once as the model decodes together (`model.info.parallel`),
    `max_queue` more wait in its scheduler; `limits` bound what one request
    may ask (`max_tokens_limit`, `max_body_bytes` set two of them); `cors_origins` may call it
    from web pages; `max_connections` caps open connections (default: what the open-file
    limit leaves)."""
    timeouts = timeouts or Timeouts()
    holder: list[Server] = []
    service = make_app(
        model,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        api_key=api_key,
        max_queue=max_queue,
        limits=limits,
        model_name=model_name,
        cors_origins=cors_origins,
        timeouts=timeouts,
        connections=lambda: len(holder[0].connections.open) if holder else 0,
    )
    server = Server(service, host, port, max_connections, timeouts)
    holder.append(server)
    return server


def start_warnings(host: str, api_key: str | None) -> list[str]:
    """What to tell whoever starts a server: an open address without a key."""
    if is_loopback(host) or api_key:
        return []
    return [f"listening on {host} without --api-key: anyone who can reach this machine can use the model"]


def serve(model: Model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, **kw: Any) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain (see the module docstring) and return."""
    server = make_server(model, host, port, api_key, **kw)
    for warning in start_warnings(host, api_key):
        print(f"pocketlm: warning: {warning}", file=sys.stderr, flush=True)
    line = f"serving {server.model_name} on {server.url} ({server.describe()}; Ctrl-C to stop)"
    server.on_ready = lambda: print(line, flush=True)
    server.serve_forever()
    if server.stop_reason:
        log.info("stopped by %s", server.stop_reason)

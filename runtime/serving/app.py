"""The OpenAI-compatible service over one loaded model: a Starlette ASGI app (`make_app`).

    app = make_app(pocketlm.load("bloomz-560m-q4_k_m.gguf"))   # any ASGI server, or Ray Serve

Endpoints (`ENDPOINTS`): `GET /health`, `GET /metrics` (Prometheus), `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent
events (`"stream": true`), `POST /v1/embeddings`, and llama-server's `POST /tokenize` and
`POST /detokenize` (also under /v1, as vLLM's). Errors have OpenAI's shape, `{"error":
{"message", "type", "param", "code"}}`. What a request may ask and how it becomes a prompt and
options is runtime/serving/openai_api.py; sockets, connections and signals are
runtime/serving/http.py's; docs/server.md describes the endpoints and the table of fields.

A completion of several prompts submits them to the scheduler together (`Model.submit`): they
decode together, each prompt one request to admission (more than --max-queue plus --parallel
prompts can never be admitted: 400). An echoed prompt's log-probabilities come from
`Model.logits`, computed in the request's thread before its generation is submitted
(`Generation._prompt_logits`). Embeddings and tokenizations run in threads, at most --max-queue
plus --parallel at once (429 beyond).

Admission: the model's scheduler holds the one queue. As many generations run as the model
decodes together (`pocketlm.load(parallel=N)`); `max_queue` more wait in its scheduler, in
order; a request that finds the queue full gets 429 with `Retry-After: 1`. The scheduler's
thread hands tokens to the event loop (a model decoding one sequence at a time steps in each
generation's own thread). A client that goes away, streaming or not, has its generation cancelled and its sequence
freed at the next engine step. A request's body must arrive within `Timeouts.body` seconds; a
stream's client must take each event within `Timeouts.write`. Bodies may be chunked.

Shutdown (`begin_drain`, then `abort` when the drain time is over): no new generations (503);
at `abort` every open stream gets, for each unfinished choice, a chunk with `finish_reason:
"abort"` and then `data: [DONE]` (a whole response comes back with the text so far and
`finish_reason: "abort"`).

Security: on a loopback address (`loopback_port` set), only requests whose Host is a loopback
name or address are answered (403 otherwise: a DNS-rebinding page cannot drive the server).
Requests from web pages (an Origin header) are refused unless their origin was allowed
(`cors_origins`, CLI `--cors-origin`), which then get CORS headers and preflight answers.
Everything but /health needs the API key when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

from pocketlm.converters.core.errors import EngineError, Overloaded, PocketLMError, RequestError, first_line
from pocketlm.converters.core.gguf_split import split_parts
from pocketlm.core.engine import StepEngine
from pocketlm.core.generation import GenerationResult, StreamEvent, TokenLogprob, TokenStream
from pocketlm.core.model import Model
from pocketlm.serving.metrics import CONTENT_TYPE, Metrics
from pocketlm.serving.openai_api import (
    ApiError,
    Echo,
    GenerationRequest,
    Limits,
    Reply,
    embeddings_reply,
    parse_detokenize,
    parse_embeddings,
    parse_request,
    parse_tokenize,
    piece,
)

__all__ = ["ENDPOINTS", "Limits", "Service", "Timeouts", "is_loopback", "make_app"]

log = logging.getLogger("pocketlm.server")

# path -> {HTTP method: the Service method that answers}. A new endpoint is a row here and its
# method; routing, 404/405 answers, auth and `pocketlm serve --help` follow the table.
ENDPOINTS: dict[str, dict[str, str]] = {
    "/health": {"GET": "health"},
    "/metrics": {"GET": "metrics"},
    "/v1/models": {"GET": "models"},
    "/v1/completions": {"POST": "completions"},
    "/v1/chat/completions": {"POST": "chat"},
    "/v1/embeddings": {"POST": "embeddings"},
    "/tokenize": {"POST": "tokenize"},  # llama-server's (and vLLM's, lm-eval's) paths
    "/detokenize": {"POST": "detokenize"},
    "/v1/tokenize": {"POST": "tokenize"},
    "/v1/detokenize": {"POST": "detokenize"},
}
PUBLIC = {"/health"}  # answered without the API key


@dataclass(frozen=True)
class Timeouts:
    """How long the server waits for a client (seconds), and for running work at shutdown. The
    service enforces body, write and drain; the HTTP transport (http.py) header and keep-alive."""

    header: float = field(
        default=10.0, metadata={"help": "for a request's headers, from connecting or the last response"}
    )
    body: float = field(default=30.0, metadata={"help": "for a request's body, once its headers are in"})
    write: float = field(default=30.0, metadata={"help": "for a stream's client to take each event"})
    keep_alive: float = field(default=5.0, metadata={"help": "an idle connection is kept between requests"})
    drain: float = field(default=30.0, metadata={"help": "at shutdown for running generations, before they are cut"})

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise PocketLMError(f"--{f.name.replace('_', '-')}-timeout {getattr(self, f.name)}: must be > 0")


# -- a generation, seen from the event loop ----------------------------------------------------
_END = object()
_ABORT = object()


class Generation:
    """One request's TokenStreams (one per prompt, submitted together so they decode together),
    their events handed to the event loop's queue with each choice's index in the reply (prompt
    i's j-th choice at i*n+j): by the model's scheduler thread when it decodes many requests
    together, else read in this generation's thread (the engine blocks). A short-lived thread
    starts it (tokenizing a long prompt, or scoring an echoed one, must not hold up the event
    loop). `cancel()` (the client left) stops it at the next engine step; `abort()` (shutdown)
    also ends what the loop reads at once."""

    def __init__(self, model: Model, request: GenerationRequest, limits: Limits):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        self._ended = 0  # streams that delivered their end
        self._ends = threading.Lock()
        self.streams: list[TokenStream] = []
        self.echoes: list[Echo] | None = None  # set before the first event is handed over
        self.request = request
        self.thread = threading.Thread(target=self._run, args=(model, limits), name="pocketlm-request", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is reading
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self, model: Model, limits: Limits) -> None:
        try:
            request = self.request
            if limits.max_prompt_tokens is not None:
                for prompt in request.prompts:
                    n = len(model.tokenize(prompt)) if isinstance(prompt, str) else len(prompt)
                    if n > limits.max_prompt_tokens:
                        over = limits.over("max_prompt_tokens")
                        message = f"the prompt has {n} tokens; at most {limits.max_prompt_tokens} {over}"
                        raise ApiError(400, message, param="messages" if request.chat else "prompt")
            if request.echo:
                self.echoes = [self._echo(model, prompt) for prompt in request.prompts]
            if len(request.prompts) == 1:
                self.streams = [model.stream_tokens(request.prompts[0], request.options)]
            else:  # submitted together: one admission, decoded together
                self.streams = model.submit(request.prompts, request.options)
            if self._stop.is_set():
                self.cancel()
            n = request.options.num_return_sequences
            if self.streams[0].deliver(self._sink(0)):  # a scheduler's thread hands the tokens over
                for i, stream in enumerate(self.streams[1:], 1):
                    stream.deliver(self._sink(i * n))
                return
            for i, stream in enumerate(self.streams):  # each read in turn: every step advances them all
                with stream:
                    for event in stream:
                        self._put(_shifted(event, i * n))
                        if self._stop.is_set():
                            break
                if self._stop.is_set():
                    break
            self._put(_END)
        except BaseException as e:  # handed to the reader, which answers or logs it
            self._put(e)

    def _sink(self, offset: int) -> Callable[[Any], None]:
        """What one prompt's stream hands its events to; the last stream's end is the end."""

        def sink(item: Any) -> None:
            if item is not None:
                self._put(_shifted(item, offset))
                return
            with self._ends:
                self._ended += 1
                last = self._ended == len(self.streams)
            if last:
                self._put(_END)

        return sink

    def _echo(self, model: Model, prompt: str | list[int]) -> Echo:
        """The prompt a completion echoes; with logprobs, each token's log-probability under the
        model (log-softmax of its own logits over the prompt, the rows `Model.logits` returns)."""
        ids = model.prompt_ids(prompt)
        text = prompt if isinstance(prompt, str) else b"".join(map(model.token_bytes, ids)).decode("utf-8", "replace")
        top = self.request.options.logprobs
        if top is None:
            return Echo(text, ids)
        return Echo(text, ids, self._prompt_logprobs(model, ids, top))

    def _prompt_logprobs(self, model: Model, ids: list[int], top: int) -> list[TokenLogprob]:
        """`Model.prompt_logprobs` while other requests decode. On a step engine the evaluation
        takes a free slot and KV cells beside the running sequences' for the length of the call,
        holding the engine's lock (no step runs meanwhile): it starts only when the cells are
        free as the scheduler's admission counts them (a llama.cpp batch that finds no room
        clears every sequence's cache); meanwhile a client that goes away ends the wait."""
        engine = model.engine
        if not isinstance(engine, StepEngine):
            return model.prompt_logprobs(ids, top)
        with engine.lock:
            while not engine.freed.wait_for(lambda: engine.can_admit(len(ids)), timeout=0.5):
                if self._stop.is_set():
                    raise EngineError("the client went away")
            return model.prompt_logprobs(ids, top)

    def cancel(self) -> None:
        self._stop.set()
        for stream in list(self.streams):
            stream.cancel()

    def abort(self) -> None:
        self.cancel()
        self._queue.put_nowait(_ABORT)

    async def next(self) -> StreamEvent | object:
        """The next event, `_END`, or `_ABORT`; the generation's error is raised."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def results(self) -> list[GenerationResult]:
        """Each prompt's result (its choices: `sequences`)."""
        return [stream.result for stream in self.streams]


def _shifted(event: Any, offset: int) -> Any:
    """A prompt's event as its choice in the reply (several prompts: prompt i's at i*n)."""
    return (
        dataclasses.replace(event, index=event.index + offset) if offset and isinstance(event, StreamEvent) else event
    )


# -- the application ------------------------------------------------------------------------------
class Service:
    """The OpenAI API over one model, as an ASGI app (`make_app`): routing, the Host, Origin
    and key checks, admission, generations, metrics. Knows nothing of sockets."""

    def __init__(
        self,
        model: Model,
        api_key: str | None = None,
        max_queue: int = 64,
        limits: Limits | None = None,
        model_name: str | None = None,
        cors_origins: Sequence[str] = (),
        loopback_port: int | None = None,
        timeouts: Timeouts | None = None,
        connections: Callable[[], int] | None = None,
    ):
        self.model, self.api_key = model, api_key
        self.model_name = model_name or default_name(model)
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.parallel = max(1, model.info.parallel)
        if max_queue < 0:
            raise PocketLMError(f"the server needs max_queue >= 0 (got {max_queue})")
        self.max_queue = max_queue
        model.scheduler.max_waiting = max_queue  # the one queue: the scheduler's
        self.cors_origins = {o.rstrip("/") for o in cors_origins}
        self.loopback_port = loopback_port  # set: only loopback Host names with this port (or none)
        self.created = int(time.time())
        self.draining = False  # shutting down: no new generations
        self.live: set[Generation] = set()
        self.metrics = Metrics(self._gauges(connections))
        routes = [
            Route(path, getattr(self, "_" + name), methods=[method])
            for path, methods in ENDPOINTS.items()
            for method, name in methods.items()
        ]
        self.router = Router(routes)
        self._threads: set[threading.Thread] = set()
        self.side_jobs = 0  # embeddings and tokenizations running in threads
        self._dimensions: int | None = None  # the model's embedding size, once known

    def _gauges(self, connections: Callable[[], int] | None) -> dict[str, tuple[str, Callable[[], float]]]:
        model = self.model

        # names and help texts are the public /metrics output
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "pocketlm_requests_running": ("Generations running", lambda: model.scheduler.load[0]),
            "pocketlm_requests_waiting": (
                "Generations waiting in the model's queue (for a place, or for KV cells)",
                lambda: model.scheduler.load[1],
            ),
            "pocketlm_sequences_running": (
                "Sequences being decoded (samples and beams count one each)",
                lambda: model.scheduler.sequences_running,
            ),
            "pocketlm_kv_cells_in_use": (
                "KV cache cells reserved by running sequences (prompt and max new tokens)",
                lambda: getattr(model, "kv_cells_in_use", 0),
            ),
            "pocketlm_kv_cells": (
                "KV cache cells, all sequences together (0: the engine manages its cache)",
                lambda: model.info.kv_cells,
            ),
        }
        if connections is not None:
            gauges["pocketlm_connections"] = ("Open HTTP connections", connections)
        return gauges

    # -- ASGI ---------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started, status, path = time.perf_counter(), 0, _printable(scope["path"].rstrip("/") or "/")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        extra = [] if origin is None or not self.origin_allowed(origin) else _cors_headers(origin)
        note: dict[str, str] = {}
        scope.setdefault("state", {})["note"] = note

        async def send_with_cors(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            response = self._guard(scope, path, headers)
            if response is None:
                scope["path"] = path
                await self.router(scope, receive, send_with_cors)
            else:
                await response(scope, receive, send_with_cors)
        except ApiError as e:
            note["text"] = e.message
            await _error(e)(scope, receive, send_with_cors)
        except Exception:
            log.exception("error handling %s %s", scope["method"], path)
            note["text"] = "internal error"
            if not status:
                error = ApiError(500, "internal server error", type="server_error", headers={"Connection": "close"})
                await _error(error)(scope, receive, send_with_cors)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status or 499)).inc()
            client = scope.get("client") or ("-", 0)
            log.info(
                '%s "%s %s" %s %.2fs %s',
                client[0],
                scope["method"],
                path,
                status or "-",
                time.perf_counter() - started,
                note.get("text", ""),
            )

    def _guard(self, scope: Scope, path: str, headers: dict[str, str]) -> Response | None:
        """The checks before routing (Host, Origin, route, preflight, key); a response ends it."""
        if not self.host_allowed(headers.get("host")):
            raise ApiError(403, "this server answers only requests addressed to localhost", code="forbidden_host")
        origin = headers.get("origin")
        if not self.origin_allowed(origin):
            raise ApiError(
                403, f"origin {_printable(origin or '')} is not allowed (see --cors-origin)", code="forbidden_origin"
            )
        route = ENDPOINTS.get(path)
        method = scope["method"]
        if route is None:
            raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
        if method == "OPTIONS" and origin is not None:  # a CORS preflight carries no key
            preflight = Response(status_code=204)
            preflight.raw_headers += [
                (b"Access-Control-Allow-Methods", ", ".join([*route, "OPTIONS"]).encode()),
                (b"Access-Control-Allow-Headers", b"Authorization, Content-Type"),
                (b"Access-Control-Max-Age", b"600"),
            ]
            return preflight
        if path not in PUBLIC and not self._authorized(headers.get("authorization", "")):
            raise ApiError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if method not in route and not (method == "HEAD" and "GET" in route):
            raise ApiError(
                405,
                f"{path} accepts {', '.join(route)}",
                code="method_not_allowed",
                headers={"Allow": ", ".join(route)},
            )
        return None

    def host_allowed(self, host: str | None) -> bool:
        """On loopback, only requests addressed to a loopback name: a page that rebinds its
        own domain to 127.0.0.1 (DNS rebinding) sends that domain as Host and is refused."""
        if self.loopback_port is None or host is None:
            return True
        name, port = _split_host(host)
        return is_loopback(name) and port in (None, self.loopback_port)

    def origin_allowed(self, origin: str | None) -> bool:
        """Browsers name the page's origin; only those given with --cors-origin may call."""
        return origin is None or "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins

    def _authorized(self, header: str) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    # -- endpoints ----------------------------------------------------------------------------
    async def _health(self, request: Request) -> Response:
        running, waiting = self.model.scheduler.load
        body = {
            "status": "draining" if self.draining else "ok",
            "model": self.model_name,
            "parallel": self.parallel,
            "kv_cells": self.model.info.kv_cells,
            "running": running,
            "waiting": waiting,
        }
        return JSON(body, status_code=503 if self.draining else 200)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pocketlm"}
        return JSON({"object": "list", "data": [card]})

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _embeddings(self, request: Request) -> Response:
        parsed = parse_embeddings(await self._read_json(request), self.limits)
        self._refuse_when_draining()
        embed = getattr(self.model, "embed", None)
        if embed is None:
            raise ApiError(400, "this model cannot compute embeddings", param="input", code="unsupported_value")
        if parsed.dimensions is not None and self._dimensions is not None:
            self._check_dimensions(parsed.dimensions)
        found = await self._side(lambda: embed(parsed.inputs), "input")
        vectors = np.asarray(found.vectors, dtype=np.float32)
        self._dimensions = int(vectors.shape[1])
        if parsed.dimensions is not None:
            self._check_dimensions(parsed.dimensions)
        self.metrics.embedding_tokens.inc(found.tokens)
        request.state.note["text"] = f"{len(vectors)} inputs, {found.tokens} tokens"
        return JSON(embeddings_reply(self.model_name, vectors, found.tokens, parsed.base64))

    def _check_dimensions(self, asked: int) -> None:
        if asked != self._dimensions:
            raise ApiError(
                400,
                f"'dimensions' must be this model's embedding size, {self._dimensions}: its embeddings are not "
                "trained to be shortened",
                param="dimensions",
                code="unsupported_value",
            )

    async def _tokenize(self, request: Request) -> Response:
        parsed = parse_tokenize(await self._read_json(request))
        self._refuse_when_draining()
        ids = await self._side(lambda: self.model.tokenize(parsed.text, parsed.add_special), "content")
        tokens: list[Any] = ids
        if parsed.with_pieces:
            tokens = [{"id": t, "piece": piece(self.model.token_bytes(t))} for t in ids]
        return JSON({"tokens": tokens, "count": len(ids), "max_model_len": self.model.info.n_ctx})

    async def _detokenize(self, request: Request) -> Response:
        ids = parse_detokenize(await self._read_json(request), self.model.info.vocab_size)
        self._refuse_when_draining()
        text = await self._side(lambda: self.model.detokenize(ids), "tokens")
        return JSON({"content": text, "prompt": text})  # llama-server's name, vLLM's

    async def _side(self, work: Callable[[], Any], param: str) -> Any:
        """Model work besides generations (embeddings, tokens) in a thread of its own: at most
        --max-queue plus --parallel at once (429 beyond); the model's refusals are 400s about
        `param`."""
        if self.side_jobs >= self.max_queue + self.parallel:
            raise _busy()
        self.side_jobs += 1
        try:
            return await asyncio.to_thread(work)
        except EngineError as e:
            raise ApiError(500, first_line(e), type="server_error") from None
        except (PocketLMError, UnicodeError) as e:
            raise ApiError(400, first_line(e), param=param) from None
        finally:
            self.side_jobs -= 1

    def _refuse_when_draining(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", headers={"Connection": "close"})

    async def _generate(self, request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        body = await self._read_json(request)
        parsed = parse_request(body, chat, self.limits, self.model)
        most = self.max_queue + self.parallel
        if len(parsed.prompts) > most:
            raise ApiError(
                400,
                f"'prompt' holds {len(parsed.prompts)} prompts; this server takes at most {most} at once "
                f"(--max-queue {self.max_queue} waiting beside --parallel {self.parallel} running)",
                param="prompt",
            )
        self._refuse_when_draining()
        gone = asyncio.ensure_future(_disconnected(request.receive))
        generation = Generation(self.model, parsed, self.limits)
        self._threads = {t for t in self._threads if t.is_alive()} | {generation.thread}
        self.live.add(generation)
        gone.add_done_callback(lambda _: generation.cancel())
        streaming = False
        try:
            first = await generation.next()
            if first is _ABORT:
                raise ApiError(503, "the server is shutting down", type="server_error")
            n = parsed.options.num_return_sequences
            reply = Reply(chat, self.model_name, self.model.token_bytes, parsed.tools, n, generation.echoes)
            events = self._events(generation, first, arrived)
            if parsed.stream:
                streaming = True  # the stream's response finishes the generation
                return EventStream(self, generation, reply, events, gone)
            response = await self._whole(reply, events, generation)
            request.state.note["text"] = "client went away" if gone.done() else response.note
            return response
        except Overloaded:  # the model's queue is full
            raise _busy() from None
        except EngineError as e:  # the engine failed a request that was fine: ours, not the caller's
            raise ApiError(500, first_line(e), type="server_error") from None
        except (PocketLMError, UnicodeError) as e:  # UnicodeError: lone surrogates in the JSON
            # the model refused an option (a constraint it cannot compile or write, a token id
            # outside its vocabulary): named as the request spelled it; else the prompt
            raise ApiError(400, str(e), param=parsed.param_of(str(e)) or "prompt") from None
        finally:
            if not streaming:
                self._finish(generation, gone)

    def _finish(self, generation: Generation, gone: asyncio.Future[Any]) -> None:
        generation.cancel()  # no-op when it ended by itself
        self.live.discard(generation)
        gone.cancel()

    async def _events(self, generation: Generation, first: Any, arrived: float) -> AsyncIterator[Any]:
        """A generation's events (and `_ABORT`), timed for the metrics."""
        item, last, tokens = first, 0.0, 0
        while item is not _END:
            if isinstance(item, StreamEvent) and item.token_id is not None:
                now = time.perf_counter()
                if tokens == 0:
                    self.metrics.time_to_first_token.observe(now - arrived)
                else:
                    self.metrics.time_per_output_token.observe(now - last)
                last, tokens = now, tokens + 1
            yield item
            if item is _ABORT:
                return
            item = await generation.next()
        results = generation.results
        self.metrics.prompt_tokens.inc(sum(r.prompt_tokens for r in results))
        self.metrics.generation_tokens.inc(sum(r.completion_tokens for r in results))

    async def _whole(self, reply: Reply, events: AsyncIterator[Any], generation: Generation) -> JSON:
        request = generation.request
        total = request.choices
        texts = [""] * total
        logprobs: list[list[TokenLogprob] | None] = [[] if request.logprobs else None for _ in range(total)]
        aborted = False
        async for event in events:
            if event is _ABORT:
                aborted = True
                break
            texts[event.index] += event.text
            lps = logprobs[event.index]
            if lps is not None and event.logprob is not None:
                lps.append(event.logprob)
        n = request.options.num_return_sequences
        results = [_cut(r, n) for r in generation.results] if aborted else generation.results
        response = JSON(reply.whole(texts, logprobs, results))
        response.note = _summary(results)
        return response

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        close = {"Connection": "close"}
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "invalid Content-Length", headers=close)
            if int(length) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)", headers=close)

        async def read() -> bytes:
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)", headers=close)
            return bytes(data)

        try:
            data = await asyncio.wait_for(read(), self.timeouts.body)
        except asyncio.TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {self.timeouts.body:g} s", headers=close
            ) from None
        except ClientDisconnect:
            raise ApiError(400, "the client closed before sending its body", headers=close) from None

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            body = json.loads(data, parse_constant=no_constants)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    # -- shutdown -----------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Shutdown has begun: refuse new generations (503); running ones go on."""
        self.draining = True

    def abort(self) -> None:
        """The drain time is over: cut every running generation, refuse every waiting one."""
        self.draining = True
        for generation in list(self.live):
            generation.abort()

    def join_generations(self, timeout: float) -> None:
        """Wait for the engine threads of cut generations to end (before the model closes)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))


class EventStream(Response):
    """A generation as server-sent events; the write deadline drops a client that stops reading."""

    def __init__(
        self,
        service: Service,
        generation: Generation,
        reply: Reply,
        events: AsyncIterator[Any],
        gone: asyncio.Future[Any],
    ):
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        self.service, self.generation, self.reply, self.events, self.gone = service, generation, reply, events, gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request, reply, note = self.generation.request, self.reply, scope["state"]["note"]
        n, total = request.options.num_return_sequences, request.choices
        write = self.service.timeouts.write

        async def event(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            message = {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}
            await asyncio.wait_for(send(message), write)

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for i in range(total):  # chat: each choice's role; an echo: each choice's prompt
                first = reply.chunk(role=True, index=i) if reply.chat else reply.echo_chunk(i, request.logprobs)
                if first is not None:
                    await event(first)
            aborted = False
            held = [""] * total  # a forced tool call's text: sent as one call at the end (Reply.closing)
            try:
                async for item in self.events:
                    if self.gone.done():
                        note["text"] = "client went away"
                        return
                    if item is _ABORT:
                        aborted = True
                        break
                    logprobs = [item.logprob] if request.logprobs and item.logprob is not None else None
                    if reply.tools is not None:
                        held[item.index] += item.text
                    text = item.text if reply.tools is None else None
                    if text or logprobs:
                        await event(reply.chunk(text, index=item.index, logprobs=logprobs))
            except asyncio.TimeoutError:
                raise
            except Exception as e:  # headers are sent: report it in the stream
                if not isinstance(e, (PocketLMError, UnicodeError)):
                    log.exception("generation failed")
                if isinstance(e, RequestError):  # the request's (a constraint's dead end): 400's error
                    error = ApiError(400, first_line(e), param=request.param_of(str(e)))
                else:
                    error = ApiError(500, first_line(e) or "generation failed", type="server_error")
                await event(error.body())
                await send({"type": "http.response.body", "body": b"", "more_body": False})  # a whole stream
                note["text"] = str(e)
                return
            results = self.generation.results
            if aborted:
                results = [_cut(r, n) for r in results]
            for i, r in enumerate(seq for result in results for seq in result.sequences[:n]):
                for chunk in reply.closing(i, held[i], r.finish_reason):
                    await event(chunk)
            if request.include_usage:
                await event(reply.usage_chunk(results))
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            note["text"] = _summary(results)
        except asyncio.TimeoutError:  # the client does not read: drop it
            note["text"] = f"client took no data for {write:g} s"
            connection = scope.get("pocketlm.connection")
            if connection is not None:
                connection.transport.abort()
                await asyncio.sleep(0)  # uvicorn sees the connection lost before the app returns
        finally:
            self.service._finish(self.generation, self.gone)


class JSON(Response):
    """A JSON body as `json.dumps` writes it (as the server always has), and a log note."""

    media_type = "application/json"
    note = ""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


def _cut(result: GenerationResult, n: int) -> GenerationResult:
    """A generation cut by shutdown, as a copy: sequences that had not ended by themselves
    (end of sequence, stop string) finish with "abort"; choices not yet made are empty."""
    seqs = [
        dataclasses.replace(
            r, token_ids=list(r.token_ids), others=[], finish_reason="stop" if r.finish_reason == "stop" else "abort"
        )
        for r in result.sequences[:n]
    ]
    seqs += [GenerationResult("", [], "abort", result.prompt_tokens, index=i) for i in range(len(seqs), n)]
    seqs[0].others = seqs[1:]
    return seqs[0]


def _summary(results: list[GenerationResult]) -> str:
    prompt, new = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    prompts = f"{len(results)} prompts, " if len(results) > 1 else ""
    return f"{prompts}{prompt}+{new} tokens, {results[0].finish_reason}"


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body must have been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _busy() -> ApiError:
    """The 429 of a server whose queue (or side work) is full: retry in a second."""
    return ApiError(
        429,
        "the server is busy; retry shortly",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
    )


def _error(e: ApiError) -> Response:
    return JSON(e.body(), status_code=e.status, headers=e.headers)


def make_app(
    model: Model, max_tokens_limit: int | None = None, max_body_bytes: int | None = None, **kwargs: Any
) -> Service:
    """The ASGI app alone (Ray Serve's ingress, or any ASGI server): `Service`'s arguments, and
    `make_server`'s shortcuts for two limits."""
    kwargs["limits"] = _limits(kwargs.get("limits"), max_tokens_limit, max_body_bytes)
    return Service(model, **kwargs)


def _limits(limits: Limits | None, max_tokens: int | None, max_body_bytes: int | None) -> Limits:
    limits = limits or Limits()
    if max_tokens is not None:
        limits = replace(limits, max_tokens=max_tokens)
    if max_body_bytes is not None:
        limits = replace(limits, max_body_bytes=max_body_bytes)
    return limits


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine only (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_host(host: str) -> tuple[str, int | None]:
    """A Host header's name and port ("[::1]:8000" -> ("::1", 8000))."""
    host = host.strip()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, port = host.split(":")
    else:
        name, port = host, ""
    return name, int(port) if port.isdigit() else None


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"Access-Control-Allow-Origin", origin.encode("latin-1")), (b"Vary", b"Origin")]


def _printable(text: str) -> str:
    """Text safe to log: control and non-ASCII characters escaped."""
    return ascii(text)[1:-1]


def default_name(model: Model) -> str:
    """The model's file or folder name; PocketLM's cache calls every file "model", so then
    architecture and quant."""
    path = Path(model.info.path)
    split = split_parts(path.name)  # a split model's first file: its name without the file number
    name = split[0] if split else path.stem if path.suffix == ".gguf" else path.name
    return name if name and name != "model" else f"{model.info.architecture}-{model.info.quant}"

"""An OpenAI-compatible HTTP server over one loaded model, on the standard library alone.

    server = make_server(runtime.load("bloomz-560m-q4_k_m.gguf"), port=8000)
    server.serve_forever()   # or serve(model): blocking, Ctrl-C stops it

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, whole or streamed as server-sent events (`"stream": true`).
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

Sampling follows OpenAI's API, not PocketLM's CLI: `temperature` defaults to 1.0 (send 0 for
greedy decoding); `max_tokens` defaults to 16 for completions and to the server's limit for
chat. `n` (up to 16 choices), `logprobs` (completions: the number of alternatives; chat:
`logprobs: true` with `top_logprobs`), `presence_penalty` and `frequency_penalty` have
OpenAI's meaning; `top_k`, `repetition_penalty`, `no_repeat_ngram_size` and beam search
(`num_beams`, `length_penalty`, `early_stopping`: transformers' meaning; `n` beams come back;
temperature defaults to 0 with beams) are accepted as extras. Log-probabilities are the
model's own, before penalties and temperature. Fields PocketLM cannot honour (`best_of`,
`echo`, `logit_bias`, ...) are refused unless they hold their neutral value. Unknown fields
are ignored.

Chat prompts: these are instruction models without a chat template. A lone user message
(after optional system messages) is sent as `system + "\\n\\n" + user`, or the bare user text;
longer conversations become a transcript `"{system}\\n\\nUser: ...\\nAssistant: ...\\nUser:
...\\nAssistant:"`.

Load: `max_concurrent` generations run at once (default: the sequences the model decodes
together, `runtime.load(parallel=N)`, whose scheduler batches them), `max_queue` more wait,
further requests get 429 with `Retry-After: 1`. A client that goes away mid-stream frees its
slot at the next token. `/health` reports parallel, KV cells, running and waiting sequences.

Security: bound to a loopback address, only requests whose Host is a loopback name or address
are answered (403 otherwise: a DNS-rebinding page cannot drive the server). Requests from web
pages (an Origin header) are refused unless their origin was allowed (`cors_origins`, CLI
`--cors-origin`), which then get CORS headers and preflight answers. An open address without
an API key is warned about at start.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import itertools
import json
import logging
import secrets
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from convert.core import __version__
from convert.core.errors import PocketLMError

from .generation import (
    MAX_SEQUENCES,
    MAX_TOP_LOGPROBS,
    GenerationOptions,
    GenerationResult,
    StreamEvent,
    TokenLogprob,
    TokenStream,
)
from .model import Model

log = logging.getLogger("pocketlm.server")

REQUEST_TIMEOUT = 30.0  # seconds a client may stay silent (or not read) before it is dropped
DRAIN_SECONDS = 30.0  # how long shutdown waits for running generations to stop
# OpenAI fields PocketLM cannot honour: accepted only with their neutral value.
NEUTRAL: dict[str, Any] = {
    "best_of": 1,
    "echo": False,
    "suffix": "",
    "logit_bias": {},
    "tools": [],
}
# path -> {HTTP method: the Handler method `_<name>` that answers}. A new endpoint is a row here
# and its method; routing, 404/405 answers, auth and `pocketlm serve --help` follow the table.
ENDPOINTS: dict[str, dict[str, str]] = {
    "/health": {"GET": "health"},
    "/v1/models": {"GET": "models"},
    "/v1/completions": {"POST": "completions"},
    "/v1/chat/completions": {"POST": "chat"},
}
PUBLIC = {"/health"}  # answered without the API key
TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    str: "a string",
    list: "an array",
    dict: "an object",
}


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests ---------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    prompt: str | list[int]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # the reply carries them


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked against a JSON type (null counts as absent)."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be {TYPE_NAMES[kind]}", param=name)
    return value


def _check_neutral(body: dict[str, Any]) -> None:
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and not (value == neutral and isinstance(value, bool) == isinstance(neutral, bool)):
            raise ApiError(
                400,
                f"'{name}' is not supported by this server (only {json.dumps(neutral)})",
                param=name,
                code="unsupported_value",
            )


def _stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return [stop] if stop else None
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")


def _completion_prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt  # token ids
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "one prompt per request is supported", param="prompt", code="unsupported_value")
    raise ApiError(400, "'prompt' must be a string or an array of token ids", param="prompt")


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or text parts; null for assistant turns that made tool calls."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", param="messages")


def chat_prompt(messages: Any) -> str:
    """The prompt for a conversation (the template is in the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role, text = message.get("role"), _content(message.get("content"), i)
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant", param="messages")
    if not turns:
        raise ApiError(400, "'messages' holds no user message", param="messages")
    preamble = "\n\n".join(system)
    if len(turns) == 1 and turns[0][0] == "user":
        body = turns[0][1]
    else:
        body = "\n".join(f"{role.capitalize()}: {text}" for role, text in turns) + "\nAssistant:"
    return f"{preamble}\n\n{body}" if preamble else body


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives a request's log-probabilities list (None: none asked)."""
    if chat:
        if not _field(body, "logprobs", bool, False):
            if _field(body, "top_logprobs", int, 0):
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return None
        top = _field(body, "top_logprobs", int, 0)
        name = "top_logprobs"
    else:
        value = body.get("logprobs")
        if value is None or value is False:
            return None
        top = _field(body, "logprobs", int)
        name = "logprobs"
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", param=name)
    return top


def _search(body: dict[str, Any]) -> dict[str, Any]:
    """Beam search and the other transformers options a request may add (extras)."""
    options: dict[str, Any] = {}
    for name, kind in [("num_beams", int), ("length_penalty", float), ("no_repeat_ngram_size", int)]:
        value = _field(body, name, kind)
        if value is not None:
            options[name] = value
    early = body.get("early_stopping")
    if early is not None:
        if early not in (True, False, "never"):
            raise ApiError(400, "'early_stopping' must be true, false or \"never\"", param="early_stopping")
        options["early_stopping"] = early
    return options


def parse_request(
    body: dict[str, Any], chat: bool, max_tokens_limit: int, model: Model | None = None
) -> GenerationRequest:
    """Check a completion or chat request: its prompt and GenerationOptions (on `model`'s
    generation defaults, when given, for what the request leaves out)."""
    _check_neutral(body)
    _field(body, "model", str)
    prompt = chat_prompt(body.get("messages")) if chat else _completion_prompt(body)
    name = "max_tokens"
    max_tokens = _field(body, "max_tokens", int, 16 if not chat else max_tokens_limit)
    if chat and body.get("max_completion_tokens") is not None:
        name, max_tokens = "max_completion_tokens", _field(body, "max_completion_tokens", int)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"'{name}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param=name)
    seed = _field(body, "seed", int)
    if seed is not None and seed < 0:
        raise ApiError(400, "'seed' must be >= 0", param="seed")
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_SEQUENCES:
        raise ApiError(400, f"'n' must be between 1 and {MAX_SEQUENCES}, got {n}", param="n")
    search = _search(body)
    beams = search.get("num_beams", 1) > 1
    given: dict[str, Any] = dict(
        max_new_tokens=max_tokens,
        stop=tuple(_stop(body) or ()),
        seed=seed,
        temperature=_field(body, "temperature", float, 0.0 if beams else 1.0),
        top_k=_field(body, "top_k", int, 0),
        top_p=_field(body, "top_p", float, 1.0),
        repetition_penalty=_field(body, "repetition_penalty", float, 1.0),
        presence_penalty=_field(body, "presence_penalty", float, 0.0),
        frequency_penalty=_field(body, "frequency_penalty", float, 0.0),
        num_return_sequences=n,
        logprobs=_logprobs(body, chat),
        **search,
    )
    try:
        options = model.options(**given) if model is not None else GenerationOptions(**given)
    except PocketLMError as e:
        field = str(e).split(" ", 1)[0]  # GenerationOptions' messages start with the field's name
        param = {"num_return_sequences": "n", "max_new_tokens": name}.get(field, field if field in body else None)
        raise ApiError(400, str(e), param=param) from None
    stream_options = _field(body, "stream_options", dict, {})
    return GenerationRequest(
        prompt,
        options,
        stream=_field(body, "stream", bool, False),
        include_usage=bool(_field(stream_options, "include_usage", bool, False)),
        logprobs=options.logprobs is not None,
    )


# -- responses --------------------------------------------------------------------------
class Reply:
    """The JSON objects of one response: completion or chat, whole or streamed, with one
    choice per returned sequence and, when asked, OpenAI's log-probability objects."""

    def __init__(self, chat: bool, model: str, token_bytes: Any = None):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.token_bytes = token_bytes  # token id -> its bytes (for logprobs)
        self._offsets: dict[int, int] = {}  # completions' text_offset, per choice

    def _wrap(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _choice(self, index: int, body: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, index: int, items: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's logprobs object for some tokens of one choice (None when not asked)."""
        if items is None:
            return None
        text = self._text_of
        if self.chat:
            content = [
                {
                    **self._token(lp.token_id),
                    "logprob": lp.logprob,
                    "top_logprobs": [{**self._token(t), "logprob": v} for t, v in lp.top],
                }
                for lp in items
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for lp in items:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(text(lp.token_id))
        return {
            "tokens": [text(lp.token_id) for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in items],
            "text_offset": offsets,
        }

    def _text_of(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")

    def _token(self, token: int) -> dict[str, Any]:
        data = self.token_bytes(token)
        return {"token": data.decode("utf-8", "replace"), "bytes": list(data)}

    def whole(
        self, texts: list[str], logprobs: list[list[TokenLogprob] | None], result: GenerationResult
    ) -> dict[str, Any]:
        choices = []
        for i, (text, lps, r) in enumerate(zip(texts, logprobs, result.sequences)):
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append(self._choice(i, body, self.logprobs(i, lps), r.finish_reason))
        return self._wrap("chat.completion" if self.chat else "text_completion", choices, usage=usage(result))

    def chunk(
        self,
        text: str | None = None,
        finish: str | None = None,
        role: bool = False,
        index: int = 0,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        lp = self.logprobs(index, logprobs) if logprobs else None
        if not self.chat:
            return self._wrap("text_completion", [self._choice(index, {"text": text or ""}, lp, finish)])
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return self._wrap("chat.completion.chunk", [self._choice(index, {"delta": delta}, lp, finish)])

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(result))


def usage(result: GenerationResult) -> dict[str, int]:
    n = result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


# -- the server -------------------------------------------------------------------------
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


class Slots:
    """Admission control: `running` generations at once, `waiting` more queued, others refused."""

    def __init__(self, running: int, waiting: int):
        if running < 1 or waiting < 0:
            raise PocketLMError(
                f"the server needs max_concurrent >= 1 and max_queue >= 0 (got {running} and {waiting})"
            )
        self._free = threading.Semaphore(running)
        self._changed = threading.Condition()
        self.running, self.capacity = running, running + waiting
        self.admitted = 0

    def enter(self) -> bool:
        """Wait for a slot; False at once when the queue is full."""
        with self._changed:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
        self._free.acquire()
        return True

    def leave(self) -> None:
        self._free.release()
        with self._changed:
            self.admitted -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.admitted == 0, timeout)


class Server(ThreadingHTTPServer):
    """One model behind the OpenAI API. Use `make_server()`."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog (the default, 5, drops bursts of connections)

    def __init__(
        self,
        model: Model,
        host: str,
        port: int,
        api_key: str | None,
        max_concurrent: int,
        max_queue: int,
        max_tokens_limit: int,
        max_body_bytes: int,
        model_name: str | None,
        cors_origins: Sequence[str] = (),
    ):
        self.model, self.api_key = model, api_key
        self.model_name = model_name or default_name(model)
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.parallel = max(1, model.info.parallel)
        self.slots = Slots(max_concurrent or self.parallel, max_queue)
        self.loopback = is_loopback(host)
        self.cors_origins = {o.rstrip("/") for o in cors_origins}
        self.stopping = threading.Event()
        self.created = int(time.time())
        self._serving = False
        if ":" in host:
            self.address_family = socket.AF_INET6
        check_port(port)
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise _cannot_listen(host, port, e) from None

    def host_allowed(self, host: str | None) -> bool:
        """On loopback, only requests addressed to a loopback name: a page that rebinds its
        own domain to 127.0.0.1 (DNS rebinding) sends that domain as Host and is refused."""
        if not self.loopback or host is None:
            return True
        name, port = _split_host(host)
        return is_loopback(name) and port in (None, self.port)

    def origin_allowed(self, origin: str | None) -> bool:
        """Browsers name the page's origin; only those given with --cors-origin may call."""
        return origin is None or "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins

    def describe(self) -> str:
        """The start line's details: how many requests are decoded together, the KV budget."""
        info = self.model.info
        kv = f", KV cache {info.kv_cells} tokens" if info.kv_cells else ""
        return f"parallel {self.parallel}{kv}, queue {self.slots.capacity - self.slots.running}"

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skips HTTPServer's reverse DNS lookup
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop accepting requests, let running generations stop (at their next token), close."""
        self.stopping.set()
        if self._serving:
            super().shutdown()
        if not self.slots.wait_idle(DRAIN_SECONDS):
            log.warning("generations still running after %.0f s; closing anyway", DRAIN_SECONDS)
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("%s went away", client_address[0])
        else:
            log.exception("unexpected error serving %s", client_address[0])


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = f"pocketlm/{__version__}"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    _body_pending = False  # a request body not read yet: the connection cannot be reused
    _status = 0
    _cors: dict[str, str] = {}  # noqa: RUF012 (replaced per request, never mutated)

    ROUTES = ENDPOINTS

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        started, self._status, note = time.perf_counter(), 0, ""
        self._body_pending = "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0"
        path = _printable(urlsplit(self.path).path.rstrip("/") or "/")
        try:
            if not self.server.host_allowed(self.headers.get("Host")):
                raise ApiError(403, "this server answers only requests addressed to localhost", code="forbidden_host")
            origin = self.headers.get("Origin")
            if not self.server.origin_allowed(origin):
                raise ApiError(
                    403,
                    f"origin {_printable(origin or '')} is not allowed (see --cors-origin)",
                    code="forbidden_origin",
                )
            self._cors = {} if origin is None else _cors_headers(origin)
            route = self.ROUTES.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint: {self.command} {path}", code="not_found")
            if self.command == "OPTIONS" and origin is not None:  # a CORS preflight carries no key
                self._preflight(route)
                return
            if path not in PUBLIC and not self._authorized():
                raise ApiError(
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer KEY')",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if self.command not in route:
                raise ApiError(
                    405,
                    f"{path} accepts {', '.join(route)}",
                    code="method_not_allowed",
                    headers={"Allow": ", ".join(route)},
                )
            note = getattr(self, "_" + route[self.command])() or ""
        except ApiError as e:
            note = e.message
            self._send(e.status, e.body(), e.headers)
        except (ConnectionError, TimeoutError):
            note, self.close_connection = "client went away", True
        except Exception:
            log.exception("error handling %s %s", self.command, path)
            self.close_connection = True
            if not self._status:
                self._send(500, ApiError(500, "internal server error", type="server_error").body())
        finally:
            log.info(
                '%s "%s %s" %s %.2fs %s',
                self.client_address[0],
                self.command,
                path,
                self._status or "-",
                time.perf_counter() - started,
                note,
            )

    # -- endpoints ------------------------------------------------------------------------
    def _health(self) -> None:
        server, info = self.server, self.server.model.info
        scheduler = getattr(server.model, "_scheduler", None)
        running, waiting = scheduler.load if scheduler is not None else (0, 0)
        self._send(
            200,
            {
                "status": "ok",
                "model": server.model_name,
                "parallel": server.parallel,
                "kv_cells": info.kv_cells,
                "running": running,
                "waiting": waiting,
            },
        )

    def _preflight(self, route: dict[str, str]) -> None:
        methods = ", ".join([*route, "OPTIONS"])
        self.send_response(204)
        for name, value in {
            **self._cors,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Content-Length": "0",
        }.items():
            self.send_header(name, value)
        self.end_headers()
        self._status = 204

    def _models(self) -> None:
        card = {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "pocketlm"}
        self._send(200, {"object": "list", "data": [card]})

    def _completions(self) -> str:
        return self._generate(self._read_json(), chat=False)

    def _chat(self) -> str:
        return self._generate(self._read_json(), chat=True)

    def _generate(self, body: dict[str, Any], chat: bool) -> str:
        server = self.server
        request = parse_request(body, chat, server.max_tokens_limit, server.model)
        if not server.slots.enter():
            raise ApiError(
                429,
                "the server is busy; retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        try:
            if server.stopping.is_set():
                raise ApiError(503, "the server is shutting down", type="server_error")
            try:
                events = server.model.stream_tokens(request.prompt, request.options)
            except (PocketLMError, UnicodeError) as e:  # UnicodeError: lone surrogates in the JSON
                raise ApiError(400, str(e), param="prompt") from None
            with events:  # closing releases the model at once if the client went away
                checked = self._checked(events)
                reply = Reply(chat, server.model_name, server.model.token_bytes)
                if request.stream:
                    self._stream(reply, checked, events.result, request)
                else:
                    self._send(200, self._whole(reply, checked, events.result, request))
        finally:
            server.slots.leave()
        result = events.result
        return f"{result.prompt_tokens}+{result.completion_tokens} tokens, {result.finish_reason}"

    def _checked(self, events: TokenStream) -> Iterator[StreamEvent]:
        """The events of a generation. The first is computed now, so that errors of the first
        step are still an error response rather than a broken stream; the stream ends at
        the current token when the server shuts down."""
        try:
            first = next(events, None)
        except (PocketLMError, UnicodeError) as e:
            raise ApiError(400, str(e), param="prompt") from None
        return self._until_stopping(itertools.chain([first] if first else [], events))

    def _until_stopping(self, events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        stopping = self.server.stopping
        for event in events:
            yield event
            if stopping.is_set():  # shutting down: end at this token
                return

    def _whole(
        self, reply: Reply, events: Iterator[StreamEvent], result: GenerationResult, request: GenerationRequest
    ) -> dict[str, Any]:
        n = request.options.num_return_sequences
        texts = [""] * n
        logprobs: list[list[TokenLogprob] | None] = [[] if request.logprobs else None for _ in range(n)]
        for event in events:
            texts[event.index] += event.text
            lps = logprobs[event.index]
            if lps is not None and event.logprob is not None:
                lps.append(event.logprob)
        return reply.whole(texts, logprobs, result)

    def _stream(
        self, reply: Reply, events: Iterator[StreamEvent], result: GenerationResult, request: GenerationRequest
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        for name, value in self._cors.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")  # no length: the end of the stream is the end of the body
        self.end_headers()
        self._status = 200
        n = request.options.num_return_sequences
        if reply.chat:
            for i in range(n):
                self._event(reply.chunk(role=True, index=i))
        try:
            for event in events:
                logprobs = [event.logprob] if request.logprobs and event.logprob is not None else None
                if event.text or logprobs:
                    self._event(reply.chunk(event.text, index=event.index, logprobs=logprobs))
        except (ConnectionError, TimeoutError):
            raise
        except Exception as e:  # headers are sent: report it in the stream
            if not isinstance(e, PocketLMError):
                log.exception("generation failed")
            self._event(ApiError(500, str(e) or "generation failed", type="server_error").body())
            return
        for i, r in enumerate(result.sequences[:n]):
            self._event(reply.chunk(finish=r.finish_reason, index=i))
        if request.include_usage:
            self._event(reply.usage_chunk(result))
        self._event("[DONE]")

    # -- HTTP plumbing --------------------------------------------------------------------
    def _authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _read_json(self) -> dict[str, Any]:
        if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
            raise ApiError(411, "send the request body with a Content-Length (chunked bodies are not supported)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if not 0 <= length <= self.server.max_body_bytes:
            raise ApiError(413, f"the request body exceeds {self.server.max_body_bytes} bytes")
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionResetError("the client closed before sending its body")
        self._body_pending = False

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            body = json.loads(data, parse_constant=no_constants)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in {**self._cors, **(headers or {})}.items():
            self.send_header(name, value)
        if self._body_pending or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._status = status
        if self.command != "HEAD":
            self.wfile.write(data)

    def _event(self, payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (malformed request line or headers): JSON as well."""
        self.close_connection = True
        message = message or HTTPStatus(code).phrase
        log.info(
            '%s "%s" %d %s', self.client_address[0], _printable(self.requestline or "")[:80], code, _printable(message)
        )
        try:
            self._send(code, ApiError(code, message).body())
        except OSError:
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request, when it is done

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


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


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _printable(text: str) -> str:
    """Text safe to log: control and non-ASCII characters escaped."""
    return ascii(text)[1:-1]


def default_name(model: Model) -> str:
    """The model's file or folder name; PocketLM's cache calls every file "model", so then
    architecture and quant."""
    path = Path(model.info.path)
    name = path.stem if path.suffix == ".gguf" else path.name
    return name if name and name != "model" else f"{model.info.architecture}-{model.info.quant}"


def make_server(
    model: Model,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrent: int | None = None,
    max_queue: int = 64,
    max_tokens_limit: int = 2048,
    max_body_bytes: int = 1_000_000,
    model_name: str | None = None,
    cors_origins: Sequence[str] = (),
) -> Server:
    """A bound server (port 0 picks a free one: see `.port`, `.url`); call `.serve_forever()`.

    `max_concurrent` generations run at once (default: the sequences the model decodes
    together, `model.info.parallel`), `max_queue` more wait; `cors_origins` may call it from
    web pages."""
    return Server(
        model,
        host,
        port,
        api_key,
        max_concurrent or 0,
        max_queue,
        max_tokens_limit,
        max_body_bytes,
        model_name,
        cors_origins,
    )


def start_warnings(host: str, api_key: str | None) -> list[str]:
    """What to tell whoever starts a server: an open address without a key."""
    if is_loopback(host) or api_key:
        return []
    return [f"listening on {host} without --api-key: anyone who can reach this machine can use the model"]


def serve(model: Model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, **kw: Any) -> None:
    """Serve until Ctrl-C (then let running generations stop and return)."""
    server = make_server(model, host, port, api_key, **kw)
    for warning in start_warnings(host, api_key):
        print(f"pocketlm: warning: {warning}", file=sys.stderr, flush=True)
    print(f"serving {server.model_name} on {server.url} ({server.describe()}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()

"""The OpenAI-compatible server, on a real (tiny, random) GGUF model, through the official
`openai` client and raw HTTP: results equal Model.generate, errors have OpenAI's shape,
load control (429, client disconnects, 32 concurrent clients) and garbage on the socket."""

from __future__ import annotations

import _thread
import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.core.generation import TokenStream
from pocketlm.serving.http import Server, make_server, serve
from pocketlm.serving.openai_api import chat_prompt

PROMPT = "Translate to English: Je t'aime."
KEY = "sk-test-secret"


def tiny_gguf(folder: Path, quant: str) -> Path:
    """The tiny random BLOOM the server tests run, converted into `folder` as `quant`."""
    hf = build_random_bloom(folder / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    return convert(hf, folder / "m.gguf", quant=quant).output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    gguf = tiny_gguf(tmp_path_factory.mktemp("server"), "q8_0")
    m = pocketlm.load(gguf, n_ctx=256, threads=1)  # one thread: no spinning when the CPUs are busy
    m.generate(PROMPT, max_new_tokens=2)  # llama.cpp's first call is slow: not in any test's timing
    yield m
    m.close()


@contextlib.contextmanager
def running(model: Any, **kw: Any) -> Iterator[Server]:
    server = make_server(model, port=0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()


def wait_idle(server: Server, timeout: float) -> bool:
    """Whether the server's generations all end (and its model's queue empties) within `timeout`."""
    deadline = time.monotonic() + timeout
    while server.service.live or server.model.scheduler.load != (0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def server(model):
    with running(model, max_tokens_limit=128, model_name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """The same model in f32 (f32 KV cache) and its server: sampled outputs do not depend on
    how the prompt's cache was built (q8_0's matmuls round differently at other batch sizes)."""
    with pocketlm.load(tiny_gguf(tmp_path_factory.mktemp("server-f32"), "f32"), n_ctx=256, threads=1) as m:
        with running(m, max_tokens_limit=128, model_name="tiny") as s:
            with openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
                yield m, c


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def request(server: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    """(status, headers, parsed JSON body) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.headers, json.loads(payload) if payload else None


def assert_error(body: dict[str, Any], param: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    if param:
        assert body["error"]["param"] == param


class SlowModel:
    """The real model, streaming `delay` seconds per token: keeps a generation in flight."""

    def __init__(self, model: Any, delay: float):
        self._model, self._delay = model, delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def stream_tokens(self, *args: Any, **kwargs: Any) -> TokenStream:
        inner = self._model.stream_tokens(*args, **kwargs)

        def slowly() -> Iterator[Any]:
            with contextlib.closing(inner):
                for event in inner:
                    time.sleep(self._delay)
                    yield event

        return TokenStream(slowly(), inner.result)


# -- results --------------------------------------------------------------------------------
def test_health_and_models(server, client):
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body == {
        "status": "ok",
        "model": "tiny",
        "parallel": 1,
        "kv_cells": 256,
        "running": 0,
        "waiting": 0,
    }
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "pocketlm"
    status, _, body = request(server, "GET", "/v1/models")
    assert (
        body["object"] == "list"
        and body["data"][0]["object"] == "model"
        and isinstance(body["data"][0]["created"], int)
    )


def test_completion_equals_generate(model, client):
    expected = model.generate(PROMPT, max_new_tokens=20, temperature=0)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    choice = out.choices[0]
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason == "length"
    assert out.usage.prompt_tokens == len(model.tokenize(PROMPT)) == expected.prompt_tokens
    assert out.usage.completion_tokens == len(expected.token_ids) == 20
    assert out.usage.total_tokens == out.usage.prompt_tokens + 20


def test_stop_sequence(model, client):
    full = model.generate(PROMPT, max_new_tokens=30).text
    stop = full[5:7]
    expected = model.generate(PROMPT, max_new_tokens=30, stop=[stop])
    out = client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=30, temperature=0, stop=stop)
    assert out.choices[0].text == expected.text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_token_id_prompt(model, client):
    ids = model.tokenize(PROMPT)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == model.generate(ids, max_new_tokens=8).text


def test_seeded_sampling_matches_generate(model, client):
    kw = dict(temperature=0.8, top_p=0.9, seed=3)
    expected = model.generate(PROMPT, max_new_tokens=16, top_k=40, **kw).text
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, extra_body={"top_k": 40}, **kw)
    assert out.choices[0].text == expected
    assert expected != model.generate(PROMPT, max_new_tokens=16).text  # really sampled


def test_completion_stream(model, client, server):
    expected = model.generate(PROMPT, max_new_tokens=24)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True})
    )
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]) == expected.text


def test_chat_single_message_is_the_bare_text(model, client):
    expected = model.generate(PROMPT, max_new_tokens=16)
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        temperature=0,
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == "length" and out.usage.prompt_tokens == expected.prompt_tokens

    with_system = model.generate("Be brief.\n\n" + PROMPT, max_new_tokens=16).text
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        max_completion_tokens=16,
        temperature=0,
    )
    assert out.choices[0].message.content == with_system


def test_chat_stream(model, client):
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
    ]
    expected = model.generate("User: Hi.\nAssistant: Hello!\nUser: How are you?\nAssistant:", max_new_tokens=16)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_template():
    user = {"role": "user", "content": "Q?"}
    assert chat_prompt([user]) == "Q?"
    assert chat_prompt([{"role": "system", "content": "S."}, user]) == "S.\n\nQ?"
    assert (
        chat_prompt([user, {"role": "assistant", "content": "A."}, user])
        == "User: Q?\nAssistant: A.\nUser: Q?\nAssistant:"
    )
    assert chat_prompt(
        [{"role": "developer", "content": "S."}, user, {"role": "assistant", "content": "A."}, user]
    ) == ("S.\n\nUser: Q?\nAssistant: A.\nUser: Q?\nAssistant:")


# -- errors ---------------------------------------------------------------------------------
def test_invalid_json(server):
    for body in (b"{not json", b"[1, 2]", b'{"prompt": NaN}', b"\xff\xfe"):
        status, _, reply = request(server, "POST", "/v1/completions", body)
        assert status == 400
        assert_error(reply)


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/completions", "max_tokens", "abc"),
        ("/v1/completions", "temperature", "hot"),
        ("/v1/completions", "top_k", True),
        ("/v1/completions", "stop", 3),
        ("/v1/completions", "stream", "yes"),
        ("/v1/completions", "seed", 1.5),
        ("/v1/completions", "prompt", {"text": "hi"}),
        ("/v1/chat/completions", "messages", "hi"),
        ("/v1/chat/completions", "messages", [{"role": "wizard", "content": "hi"}]),
        ("/v1/chat/completions", "max_completion_tokens", "many"),
    ],
)
def test_wrongly_typed_fields(server, path, field, value):
    body = {"model": "tiny", "prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}], field: value}
    status, _, reply = request(server, "POST", path, body)
    assert status == 400
    assert_error(reply, param=field)


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 129},
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"seed": -1},
        {"n": 17},
        {"best_of": 2},
        {"echo": "yes"},
        {"presence_penalty": 2.5},
        {"frequency_penalty": "much"},
        {"logprobs": 21},
        {"num_beams": 3, "n": 4},
        {"num_beams": 2, "temperature": 0.5},
        {"early_stopping": "sometimes"},
        {"prompt": ["a", 1]},
        {"prompt": []},
        {"prompt": ""},
    ],
)
def test_refused_values(server, extra):
    status, _, reply = request(server, "POST", "/v1/completions", {"prompt": PROMPT, **extra})
    assert status == 400
    assert_error(reply)


def test_neutral_values_are_accepted(server):
    neutral = {
        "n": 1,
        "echo": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": None,
        "max_tokens": 2,
    }
    assert request(server, "POST", "/v1/completions", {"prompt": PROMPT, **neutral})[0] == 200


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, best_of=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hello world " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        list(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello world " * 200}],
                stream=True,
            )
        )


def test_routes_and_methods(server):
    status, _, reply = request(server, "GET", "/v1/nothing")
    assert status == 404
    assert_error(reply)
    status, headers, reply = request(server, "GET", "/v1/completions")
    assert status == 405 and headers["Allow"] == "POST"
    assert_error(reply)
    assert request(server, "DELETE", "/health")[0] == 405


def test_body_too_large(model):
    with running(model, max_body_bytes=1000) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", "5000")  # the body is not sent: refused on the header
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and response.headers["Connection"] == "close"
        assert_error(json.loads(response.read()))
        conn.close()
        assert request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 200


def test_api_key(model):
    with running(model, api_key=KEY) as server:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
            status, _, reply = request(server, "GET", "/v1/models", headers=headers)
            assert status == 401
            assert_error(reply)
        assert request(server, "GET", "/health")[0] == 200
        with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="m", prompt=PROMPT, max_tokens=2)
        with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as good:
            assert good.completions.create(model="m", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


# -- load -----------------------------------------------------------------------------------
def stream_request(port: int, max_tokens: int) -> socket.socket:
    """A raw socket with a streaming completion in flight, its first event read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while b"data: " not in received:
        data = sock.recv(4096)
        assert data, "the server closed the stream"
        received += data
    assert received.startswith(b"HTTP/1.1 200")
    return sock


def hard_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, no FIN
    sock.close()


def test_full_queue_gets_429(model):
    assert model.generate(PROMPT, max_new_tokens=200).finish_reason == "length"  # 200 tokens = 10 s here
    with running(SlowModel(model, 0.05), max_queue=0) as server:
        busy = stream_request(server.port, 200)
        try:
            status, headers, reply = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
            assert status == 429 and headers["Retry-After"] == "1"
            assert_error(reply)
            assert reply["error"]["type"] == "rate_limit_error"
            assert request(server, "GET", "/health")[0] == 200  # no slot needed
        finally:
            hard_close(busy)


def test_disconnect_frees_the_slot(model):
    with running(SlowModel(model, 0.05), max_queue=4) as server:
        hard_close(stream_request(server.port, 200))  # ~10 s of generation left
        started = time.monotonic()
        status, _, reply = request(
            server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        )
        assert status == 200 and reply["usage"]["completion_tokens"] == 2
        assert time.monotonic() - started < 5  # not the ~10 s the abandoned stream had left
        assert wait_idle(server, 2)  # its place is returned just after the response is sent


def test_concurrent_clients_get_their_own_answers(model):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(32)]
    expected = [model.generate(p, max_new_tokens=12).text for p in prompts]  # serially, before the load

    with running(model, max_queue=64) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:

            def ask(i: int) -> str:
                kw = dict(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0)
                if i % 2:
                    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
                return client.completions.create(**kw).choices[0].text

            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(ask, range(32), timeout=120))
    wrong = [(i, answers[i], expected[i]) for i in range(32) if answers[i] != expected[i]]
    assert not wrong


def test_garbage_never_kills_the_server(server):
    junk = [
        b"\x00\xff\x16\x03\x01 garbage\r\n\r\n",  # TLS-ish bytes
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b'POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"pro',  # closed mid-body
        b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50000\r\n\r\n" + b"[" * 50000,  # deep nesting
        b"",  # connect and leave
    ]
    for data in junk:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_serve_prints_and_stops_on_ctrl_c(model, capsys):
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        serve(model, port=0, model_name="tiny")
    finally:
        timer.cancel()
    line = capsys.readouterr().out.strip()
    assert line.startswith("serving tiny on http://127.0.0.1:") and line.endswith("; Ctrl-C to stop)")
    assert "(parallel 1, KV cache 256 tokens, queue 64;" in line


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_load_200_requests_from_32_clients_complete_with_stable_memory(model):
    """Issue-8 load test: a mix of streamed and whole completions and chats, plus malformed
    requests, from 32 threads; every good request gets its full answer, bad ones a 400,
    the server stays up, and its memory does not grow with the number of requests."""
    prompts = [f"Item {i}: name a colour." for i in range(16)]
    expected = {p: model.generate(p, max_new_tokens=8).text for p in prompts}

    with running(model, max_queue=256) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def one(i: int) -> bool:
            prompt = prompts[i % len(prompts)]
            if i % 10 == 9:  # malformed: must be refused, not crash anything
                status, _, body = request(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": "many"})
                return status == 400 and "error" in body
            if i % 4 == 0:
                text = "".join(
                    c.choices[0].text
                    for c in client.completions.create(
                        model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True
                    )
                )
            elif i % 4 == 1:
                text = (
                    client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
                    )
                    .choices[0]
                    .message.content
                )
            else:
                text = (
                    client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
                )
            return text == expected[prompt]

        started = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            assert all(pool.map(one, range(50), timeout=300))  # warm-up: threads, buffers, caches
            warm = _rss_kib()
            results = list(pool.map(one, range(200), timeout=300))
        after = _rss_kib()
        assert all(results), f"{results.count(False)} of 200 requests failed"
        assert time.monotonic() - started < 300
        assert after - warm < 30_000, f"RSS grew by {after - warm} KiB over 200 requests"
        status, _, body = request(server, "GET", "/health")
        assert status == 200 and body["status"] == "ok"
        client.close()


# -- several choices, log-probabilities, beams (issue 16) ---------------------------------
def _logprob_rows(model, prompt_ids, tokens):
    """log-softmax of the teacher-forced logits predicting each token."""
    from pocketlm.core.search import log_softmax

    rows = model.logits([*prompt_ids, *tokens])[len(prompt_ids) - 1 :]
    return [log_softmax(r) for r in rows]


def test_n_and_logprobs_through_the_client(client, model):
    """n seeded samples come back as n choices equal to Model.generate's; each token's logprob
    (and its top alternatives) in OpenAI's completion shape."""
    reply = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=5, temperature=1.0, logprobs=2
    )
    expected = model.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=5, num_return_sequences=3, logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [r.text for r in expected.sequences]
    assert reply.usage.completion_tokens == expected.completion_tokens
    ids = model.tokenize(PROMPT)
    for choice, r in zip(reply.choices, expected.sequences):
        shown = [t for t in r.token_ids if not model.engine.is_end(t)]
        lp = choice.logprobs
        assert len(lp.tokens) == len(shown) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert b"".join(model.token_bytes(t) for t in shown).decode("utf-8", "replace") == choice.text
        for row, token, value, top in zip(_logprob_rows(model, ids, shown), shown, lp.token_logprobs, lp.top_logprobs):
            assert abs(value - row[token]) < 1e-4
            assert len(top) == 2 and max(top.values()) == pytest.approx(row.max(), abs=1e-4)
        assert lp.text_offset[0] == 0


def test_n_streamed_equals_whole(exact):
    """The same seeded samples and their logprob tokens, streamed (on the f32 model: a sample
    must not depend on how the prompt's cache was built, which q8_0's rounding can change)."""
    model, client = exact
    reply = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=5, temperature=1.0, logprobs=2
    )
    expected = model.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=5, num_return_sequences=3)
    assert [c.text for c in reply.choices] == [r.text for r in expected.sequences]
    chunks = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=5, temperature=1.0, logprobs=2, stream=True
    )
    texts, tokens = ["", "", ""], [[], [], []]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs:
                tokens[choice.index] += choice.logprobs.tokens
    assert texts == [c.text for c in reply.choices]
    assert tokens == [c.logprobs.tokens for c in reply.choices]


def test_chat_logprobs_streamed_and_not(client, model):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = whole.choices[0].logprobs.content
    assert "".join(c.token for c in content) == whole.choices[0].message.content
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
    )
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]


def test_beams_as_an_extra_field_streamed_and_not(client, model):
    """Beam search through extra_body: n beams come back, the best first, as Model.generate's."""
    expected = model.generate(PROMPT, max_new_tokens=8, num_beams=4, num_return_sequences=2)
    extra = {"num_beams": 4, "early_stopping": False}
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=2, extra_body=extra)
    assert [c.text for c in reply.choices] == [r.text for r in expected.sequences]
    chunks = list(
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=2, extra_body=extra, stream=True)
    )
    texts = ["", ""]
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [r.text for r in expected.sequences]
    assert finishes == {i: r.finish_reason for i, r in enumerate(expected.sequences)}
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, n=2, extra_body=extra
    )
    assert len(chat.choices) == 2 and chat.choices[0].message.content


def test_refused_options_name_their_field(server):
    """An option GenerationOptions refuses is named as the request spelled it."""
    for extra, param in [({"num_beams": 3, "n": 4}, "n"), ({"num_beams": 20}, "num_beams"), ({"top_k": -1}, "top_k")]:
        status, _, reply = request(server, "POST", "/v1/completions", {"prompt": PROMPT, **extra})
        assert status == 400
        assert_error(reply, param=param)

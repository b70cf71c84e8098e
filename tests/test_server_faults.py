"""The server against clients that misbehave and operators that stop it (issue 25): deadlines
for headers, bodies and writes, the connection cap, chunked bodies, clients that leave a
whole (non-streamed) request, per-request limits, /metrics, and a graceful drain on SIGTERM
and SIGINT that ends every stream with `finish_reason: "abort"` and `[DONE]`."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import PROMPT, SlowModel, assert_error, hard_close, request, running, tiny_gguf, wait_idle

import pocketlm
from pocketlm.cli.main import main
from pocketlm.core.generation import TokenStream
from pocketlm.serving.app import Timeouts, make_app
from pocketlm.serving.openai_api import Limits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("faults"), "q8_0")


@pytest.fixture(scope="module")
def model(gguf):
    m = pocketlm.load(gguf, n_ctx=256, threads=1)
    m.generate(PROMPT, max_new_tokens=2)
    yield m
    m.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (EOF or reset)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionError:
                return True
            if not data:
                return True
    return False


def raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send `data` on a new connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
            if b"\r\n0\r\n\r\n" in received or (b"Content-Length" in received and _complete(received)):
                return received


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return bool(sep) and len(body) >= length


# -- deadlines and the connection cap -------------------------------------------------------------
def test_silent_and_slow_clients_are_dropped_at_the_header_deadline(model):
    with running(model, timeouts=Timeouts(header=1.0)) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        slow = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        header = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 100
        dropped = False
        for byte in header:  # a byte every 0.2 s: never a whole request
            try:
                slow.send(bytes([byte]))
            except OSError:
                dropped = True
                break
            if closed_by_server(slow, 0.2):
                dropped = True
                break
        assert dropped and time.monotonic() - started < 3
        assert closed_by_server(silent, 1.0)
        assert request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200
        silent.close()
        slow.close()
        assert server.connections.timed_out == 2


def test_at_the_connection_cap_the_longest_idle_is_replaced_and_fresh_ones_refused(model):
    with running(model, max_connections=6) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]
        time.sleep(0.2)
        reply = raw(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # all have waited < 1 s
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply and b"Retry-After: 1" in reply
        time.sleep(1.1)
        status, _, body = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert closed_by_server(idle[0], 2) and not closed_by_server(idle[1], 0.1)  # the oldest made room
        assert server.connections.replaced >= 1 and server.connections.refused == 1
        for sock in idle:
            sock.close()


def test_a_body_that_does_not_arrive_gets_408(model):
    with running(model, timeouts=Timeouts(body=1.0)) as server:
        started = time.monotonic()
        reply = raw(
            server.port, b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"prompt"'
        )
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        assert b"Connection: close" in reply or b"connection: close" in reply
        assert request(server, "GET", "/health")[0] == 200


def test_chunked_bodies_are_read(model):
    expected = model.generate(PROMPT, max_new_tokens=6, temperature=0).text
    body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "temperature": 0}).encode()
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
    with running(model) as server:
        reply = raw(
            server.port,
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks,
        )
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["choices"][0]["text"] == expected


class CountingModel(SlowModel):
    """SlowModel that counts the events its engine produced."""

    produced = 0

    def stream_tokens(self, *args: Any, **kwargs: Any) -> TokenStream:
        inner = super().stream_tokens(*args, **kwargs)

        def counted() -> Any:
            with contextlib.closing(inner):
                for event in inner:
                    self.produced += 1
                    yield event

        return TokenStream(counted(), inner.result, on_cancel=inner.cancel)


def test_a_client_that_leaves_a_whole_request_has_its_generation_cancelled(model):
    assert model.generate(PROMPT, max_new_tokens=200).finish_reason == "length"
    slow = CountingModel(model, 0.05)
    with running(slow, max_queue=4) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "temperature": 0}).encode()  # ~10 s
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(0.5)
        hard_close(sock)
        started = time.monotonic()
        status, _, reply = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and reply["usage"]["completion_tokens"] == 2
        assert time.monotonic() - started < 3  # not behind the ~9 s the abandoned request had left
        assert wait_idle(server, 2)
        produced = slow.produced
        time.sleep(0.3)
        assert slow.produced == produced < 60  # the engine stopped


def test_a_stream_client_that_stops_reading_is_dropped_at_the_write_deadline(model):
    """Driven as ASGI directly: `send` stalls after the first event, as a full socket would."""
    service = make_app(model, timeouts=Timeouts(write=0.5))
    body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "query_string": b"",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "root_path": "",
        "state": {},
    }
    sent: list[dict[str, Any]] = []

    async def exchange() -> None:
        stall = asyncio.Event()
        bodies = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, Any]:
            message = next(bodies, None)
            if message is None:
                await asyncio.Event().wait()  # connected, silent
            return message  # type: ignore[return-value]

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) > 2:
                await stall.wait()  # the client reads no more

        await asyncio.wait_for(service(scope, receive, send), 10)

    started = time.monotonic()
    asyncio.run(exchange())
    assert time.monotonic() - started < 5 and sent[0]["status"] == 200
    assert not service.live and model.scheduler.load == (0, 0)
    service.join_generations(5)
    assert all(not t.is_alive() for t in service._threads)


# -- limits ---------------------------------------------------------------------------------------
LIMITED = Limits(
    max_tokens=50, max_prompt_tokens=5, max_n=2, max_beams=2, max_logprobs=2, max_stop=4, max_stop_length=8
)


@pytest.mark.parametrize(
    "extra, flag",
    [
        ({"stop": ["x"] * 5}, "--max-stop 4"),
        ({"stop": ["123456789"]}, "--max-stop-length 8"),
        ({"logprobs": 3}, "--max-logprobs 2"),
        ({"n": 3}, "--max-n 2"),
        ({"num_beams": 3}, "--max-beams 2"),
        ({"max_tokens": 51}, "--max-tokens 50"),
        ({"prompt": "one two three four five six seven eight."}, "--max-prompt-tokens 5"),
    ],
)
def test_each_limit_is_named_in_its_400(model, extra, flag):
    with running(model, limits=LIMITED) as server:
        status, _, body = request(server, "POST", "/v1/completions", {"prompt": "Hi.", "max_tokens": 2, **extra})
        assert status == 400 and flag in body["error"]["message"], body
        assert_error(body)
        assert request(server, "POST", "/v1/completions", {"prompt": "Hi.", "max_tokens": 2})[0] == 200


def test_a_hundred_thousand_stop_strings_are_refused_by_default(model):
    with running(model) as server:
        status, _, body = request(
            server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "stop": ["z"] * 100_000}
        )
    assert status == 400 and body["error"]["param"] == "stop" and "--max-stop 16" in body["error"]["message"]


def test_serve_help_lists_every_limit_and_timeout(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for name in Limits.__dataclass_fields__:
        assert Limits.flag(name) in text
    for name in Timeouts.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}-timeout" in text
    assert "--max-connections" in text


# -- metrics --------------------------------------------------------------------------------------
def _metrics(server: Any, key: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_was_sent(model):
    with running(SlowModel(model, 0.01), max_queue=64, api_key="k") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert request(server, "GET", "/metrics")[0] == 401  # behind the key

        def good(i: int) -> tuple[int, int]:
            kw = dict(model="m", prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0)
            if i % 2:
                chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
                usage = chunks[-1].usage
            else:
                usage = client.completions.create(**kw).usage
            return usage.prompt_tokens, usage.completion_tokens

        def bad(_: int) -> int:
            return request(
                server,
                "POST",
                "/v1/completions",
                {"prompt": PROMPT, "max_tokens": "many"},
                {"Authorization": "Bearer k"},
            )[0]

        seen_running = []
        stop = threading.Event()

        def scrape() -> None:
            while not stop.is_set():
                seen_running.append(_metrics(server, "k")[("pocketlm_requests_running", ())])
                time.sleep(0.02)

        scraper = threading.Thread(target=scrape)
        scraper.start()
        with ThreadPoolExecutor(8) as pool:
            usages = list(pool.map(good, range(8)))
            statuses = list(pool.map(bad, range(3)))
        stop.set()
        scraper.join()
        client.close()
        assert statuses == [400] * 3 and max(seen_running) >= 1
        m = _metrics(server, "k")
        assert m[("pocketlm_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 8
        assert m[("pocketlm_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] == 3
        assert m[("pocketlm_requests_total", (("endpoint", "/metrics"), ("status", "401")))] == 1
        assert m[("pocketlm_prompt_tokens_total", ())] == sum(p for p, _ in usages)
        assert m[("pocketlm_generation_tokens_total", ())] == sum(c for _, c in usages) == 64
        assert m[("pocketlm_time_to_first_token_seconds_count", ())] == 8
        assert m[("pocketlm_time_per_output_token_seconds_count", ())] == 8 * 7
        assert m[("pocketlm_requests_running", ())] == 0 and m[("pocketlm_requests_waiting", ())] == 0
        assert m[("pocketlm_kv_cells", ())] == 256 and m[("pocketlm_connections", ())] >= 1


# -- shutdown -------------------------------------------------------------------------------------
SERVE_SLOWLY = """
import sys, time, contextlib
sys.path.insert(0, {tests!r})
import pocketlm
from pocketlm.serving.http import Timeouts, serve
from test_server import SlowModel
model = pocketlm.load({gguf!r}, n_ctx=256, threads=1, parallel=4)
serve(SlowModel(model, 0.05), port=0, timeouts=Timeouts(drain={drain}))
model.close()
print("exited cleanly", flush=True)
"""


def _stream(port: int, max_tokens: int, out: dict[str, Any]) -> None:
    """A streamed completion; what arrived, parsed, into `out`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    data = b""
    out["started"] = threading.Event()
    while chunk := sock.recv(65536):
        data += chunk
        if b"data: {" in data:
            out["started"].set()
        if b"data: [DONE]" in data:
            break
    sock.close()
    lines = [line[6:] for line in data.decode(errors="replace").split("\n") if line.startswith("data: ")]
    out["done"] = lines[-1:] == ["[DONE]"]
    chunks = [json.loads(line) for line in lines if line.startswith("{")]
    out["finish"] = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    out["text"] = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_then_ends_every_stream_with_abort_and_done(gguf, tmp_path, sig):
    drain = 1.5
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SLOWLY.format(tests=str(ROOT / "tests"), gguf=str(gguf), drain=drain))
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + proc.stderr.read()
        port = int(line.split(" on http://127.0.0.1:")[1].split(" ")[0])
        long_streams = [{} for _ in range(3)]  # 200 tokens at 0.05 s: 10 s, cut by the drain
        short: dict[str, Any] = {}  # 10 tokens: finishes within the drain
        threads = [threading.Thread(target=_stream, args=(port, 200, out)) for out in long_streams]
        threads.append(threading.Thread(target=_stream, args=(port, 10, short)))
        for t in threads[:3]:
            t.start()
        time.sleep(0.3)
        threads[3].start()
        time.sleep(0.15)
        sent = time.monotonic()
        proc.send_signal(sig)
        for t in threads:
            t.join(30)
        proc.wait(30)
        took = time.monotonic() - sent
        assert proc.returncode == 0 and "exited cleanly" in proc.stdout.read()
        assert took < drain + 3, took
        for out in long_streams:
            assert out["done"] and out["finish"] == ["abort"] and out["text"], out
        assert short["done"] and short["finish"] == ["length"], short
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pocketlm_serve_exits_0_on_sigterm(gguf):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocketlm", "serve", str(gguf), "--port", "0", "--threads", "1", "--ctx", "256"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + proc.stderr.read()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0 and time.monotonic() - started < 5
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""One model shared by many callers: `--parallel` batching in the server, its limits under
load, and the defences a local server needs against the web pages its user opens."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import socket
import threading
import time
from typing import Any

import pytest
from test_server import running, tiny_gguf

import pocketlm
from pocketlm.serving.app import is_loopback
from pocketlm.serving.http import Server, make_server, start_warnings

PROMPTS = ["Translate to English: Je t'aime.", "What is a GGUF file?", "Bonjour.", "Is it raining?"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("shared"), "f32")


def call(server: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(payload) if payload else None


def completion(prompt: str, n: int = 16, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, **extra}


# -- security ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(gguf):
    with (
        pocketlm.load(gguf, n_ctx=256, threads=1) as model,
        running(model, cors_origins=["http://localhost:3000"]) as s,
    ):
        yield s


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "localhost:1"])
def test_a_foreign_host_is_refused(server, host):
    status, headers, body = call(
        server, "POST", "/v1/completions", completion("Hi."), {"Host": host.format(port=server.port)}
    )
    assert status == 403 and body["error"]["code"] == "forbidden_host"
    assert "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "localhost", "127.0.0.2:{port}"]
)
def test_loopback_hosts_are_answered(server, host):
    status, _, body = call(server, "GET", "/health", headers={"Host": host.format(port=server.port)})
    assert status == 200 and body["status"] == "ok"


def test_a_foreign_origin_is_refused_and_gets_no_cors_headers(server):
    for method, path, body in (("POST", "/v1/completions", completion("Hi.")), ("OPTIONS", "/v1/completions", None)):
        status, headers, payload = call(
            server, method, path, body, {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert status == 403 and payload["error"]["code"] == "forbidden_origin"
        assert not any(h.startswith("Access-Control-") for h in headers)


def test_an_allowed_origin_gets_its_preflight_and_cors_headers(server):
    origin = "http://localhost:3000"
    status, headers, _ = call(
        server,
        "OPTIONS",
        "/v1/chat/completions",
        None,
        {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == origin
    assert (
        "POST" in headers["Access-Control-Allow-Methods"] and "Authorization" in headers["Access-Control-Allow-Headers"]
    )
    status, headers, body = call(server, "POST", "/v1/completions", completion("Hi.", 2), {"Origin": origin})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == origin and headers["Vary"] == "Origin"
    assert body["choices"][0]["text"] is not None


def test_without_cors_origins_no_page_may_call(gguf):
    with pocketlm.load(gguf, n_ctx=256, threads=1) as model, running(model) as server:
        status, headers, _ = call(
            server, "POST", "/v1/completions", completion("Hi.", 2), {"Origin": "http://localhost:3000"}
        )
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        assert call(server, "POST", "/v1/completions", completion("Hi.", 2))[0] == 200  # scripts send no Origin


def test_an_open_address_without_a_key_is_warned_about(gguf, capfd):
    assert start_warnings("127.0.0.1", None) == [] and start_warnings("0.0.0.0", "k") == []
    assert "without --api-key" in start_warnings("0.0.0.0", None)[0]
    assert is_loopback("localhost") and is_loopback("::1") and is_loopback("127.3.4.5") and not is_loopback("10.0.0.1")
    with pocketlm.load(gguf, n_ctx=256, threads=1) as model:
        server = make_server(model, host="0.0.0.0", port=0)
        try:  # not on loopback: any Host is fine (users reach it by the machine's name or address)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            assert call(server, "GET", "/health", headers={"Host": "my-laptop.lan:1234"})[0] == 200
        finally:
            server.shutdown()


# -- parallel ----------------------------------------------------------------------------------
def _alone(gguf, prompts, n=16):
    with pocketlm.load(gguf, n_ctx=256, threads=1) as model:
        return [model.generate(p, max_new_tokens=n, temperature=0).text for p in prompts]


def test_parallel_requests_are_decoded_together_and_answer_as_alone(gguf):
    expected = _alone(gguf, PROMPTS)
    with pocketlm.load(gguf, n_ctx=256, threads=1, parallel=4) as model, running(model) as server:
        status, _, health = call(server, "GET", "/health")
        assert health["parallel"] == 4 and health["kv_cells"] >= 256 and model.scheduler.max_waiting == 64
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda p: call(server, "POST", "/v1/completions", completion(p)), PROMPTS))
        assert [r[2]["choices"][0]["text"] for r in replies] == expected
        assert model.scheduler.steps < 4 * 16  # engine steps were shared
        assert call(server, "GET", "/health")[2]["running"] == 0


def _stream_then_hang_up(port: int, prompt: str) -> None:
    """A client that reads a little of a stream and goes away."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        body = json.dumps(completion(prompt, 120, stream=True)).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        sock.recv(200)


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_load_64_clients_accepted_ones_answer_as_alone_the_rest_get_429(gguf):
    """More clients than slots + queue, mixed stream / non-stream, some hanging up mid-stream."""
    expected = dict(zip(PROMPTS, _alone(gguf, PROMPTS, 12)))
    with pocketlm.load(gguf, n_ctx=256, threads=1, parallel=4) as model, running(model, max_queue=12) as server:
        call(server, "POST", "/v1/completions", completion(PROMPTS[0], 2))  # warm
        idle_threads, idle_rss = threading.active_count(), _rss_kib()

        def client(i: int) -> tuple[str, Any]:
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 8 == 7:
                _stream_then_hang_up(server.port, prompt)
                return "gone", None
            stream = i % 2 == 1
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps(completion(prompt, 12, stream=stream)),
                {"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            data = response.read().decode()
            conn.close()
            if response.status == 429:
                return "busy", None
            assert response.status == 200, data
            if stream:
                chunks = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
                text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            else:
                text = json.loads(data)["choices"][0]["text"]
            return "ok", (prompt, text)

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(client, range(64)))
        answered = [o[1] for o in outcomes if o[0] == "ok"]
        assert answered and any(o[0] == "busy" for o in outcomes)
        assert all(text == expected[prompt] for prompt, text in answered)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (model.scheduler.load != (0, 0) or server.service.live):
            time.sleep(0.05)
        assert model.scheduler.load == (0, 0) and not model.engine.busy and not server.service.live
        assert sum(model.engine.busy.values()) == 0  # no KV reservation left behind
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and threading.active_count() > idle_threads:
            time.sleep(0.05)
        assert threading.active_count() <= idle_threads
        assert _rss_kib() < idle_rss + 64 * 1024  # back near idle: nothing per request kept


def test_presence_and_frequency_penalties_reach_the_sampler(gguf):
    with pocketlm.load(gguf, n_ctx=256, threads=1) as model, running(model) as server:
        expected = model.generate(PROMPTS[0], max_new_tokens=12, presence_penalty=1.0, frequency_penalty=0.5).text
        body = completion(PROMPTS[0], 12, presence_penalty=1.0, frequency_penalty=0.5)
        status, _, reply = call(server, "POST", "/v1/completions", body)
        assert status == 200 and reply["choices"][0]["text"] == expected
        assert call(server, "POST", "/v1/completions", {**body, "presence_penalty": 3})[0] == 400

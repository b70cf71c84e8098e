"""Errors say whose fault they are: a caller's mistake is a RequestError (400 from the server),
an engine's failure an EngineError (500), both GenerationErrors for callers that catch either."""

from __future__ import annotations

import pytest
from test_server import PROMPT, request, running, tiny_gguf

import pocketlm
from pocketlm.converters.core.errors import EngineError, GenerationError, RequestError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pocketlm.load(tiny_gguf(tmp_path_factory.mktemp("errors"), "q8_0"), n_ctx=256, threads=1) as m:
        yield m


def test_a_callers_mistake_is_a_request_error(model):
    with pytest.raises(RequestError, match="the context holds 256"):
        model.generate("word " * 400)
    with pytest.raises(RequestError, match="temperature"):
        model.generate(PROMPT, temperature=-1)
    assert issubclass(RequestError, GenerationError) and issubclass(EngineError, GenerationError)


def test_an_engine_failure_is_an_engine_error_and_a_500(model, monkeypatch):
    def broken(work):
        raise EngineError("llama.cpp decode failed (code -3): out of memory")

    with running(model) as server:
        status, _, body = request(server, "POST", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4})
        assert status == 400 and "context holds" in body["error"]["message"]
        monkeypatch.setattr(model.engine, "evaluate", broken)
        with pytest.raises(EngineError, match="decode failed"):
            model.generate(PROMPT, max_new_tokens=4)
        status, _, body = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert status == 500
        error = body["error"]
        assert error["type"] == "server_error" and error["message"].startswith("llama.cpp decode failed")
    monkeypatch.undo()
    assert model.generate(PROMPT, max_new_tokens=2).finish_reason in ("length", "stop")  # the model still works

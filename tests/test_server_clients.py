"""The server against the clients pointed at local model servers (issue 28): lm-evaluation-
harness's `local-completions` (echoed prompt log-probabilities, several prompts per request,
token-id prompts), LangChain's batch and embeddings, OpenAI's embeddings, llama-server's and
vLLM's /tokenize and /detokenize; and the table of OpenAI's request fields, walked against the
openai client's own type definitions.

Expected values come from the model itself (`Model.logits`, `generate`, `embed`, `tokenize`),
from transformers' tokenizer, and from lm-eval's own response parser."""

from __future__ import annotations

import base64
import json
import logging
import re
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from reference import make_t5
from test_server import PROMPT, SlowModel, assert_error, hard_close, request, running, stream_request, tiny_gguf

import pocketlm
from pocketlm.core.search import log_softmax, logprobs_of
from pocketlm.serving import openai_api
from pocketlm.serving.openai_api import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    FIELDS,
    HONOURED,
    NO_EFFECT,
    REFUSED,
    REQUEST_FIELDS,
    STRUCTURED_OUTPUTS,
    TOP_LEVEL,
    fields_table,
)

ROOT = Path(__file__).parent.parent
PROMPTS = ["Translate to English: Je t'aime.", "What is the capital of France?", "Name a color:"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny random BLOOM in f32 (its outputs do not depend on batch shapes) and its folder."""
    folder = tmp_path_factory.mktemp("clients")
    return tiny_gguf(folder, "f32"), folder / "hf"


@pytest.fixture(scope="module")
def model(built):
    with pocketlm.load(built[0], n_ctx=256, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    with running(model, max_tokens_limit=128, model_name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def parallel(built):
    """The same model decoding 4 requests together in a small KV cache, and its server."""
    with pocketlm.load(built[0], n_ctx=256, threads=1, parallel=4, kv_cells=512) as m:
        with running(m, max_tokens_limit=128, model_name="tiny") as s:
            yield m, s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def expected_prompt_logprobs(model, ids: list[int]) -> list[float]:
    """log-softmax of the model's own logits over the prompt, at each next token."""
    rows = model.logits(ids)
    return [float(log_softmax(row)[t]) for row, t in zip(rows[:-1], ids[1:])]


# -- the field table (item 6) -----------------------------------------------------------------
def _openai_fields() -> dict[str, set[str]]:
    """Each endpoint's request fields, from the installed openai client's TypedDicts."""
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params

    def keys(*dicts: typing.Any) -> set[str]:
        return {k for d in dicts for k in (*d.__required_keys__, *d.__optional_keys__)}

    return {
        COMPLETIONS: keys(
            completion_create_params.CompletionCreateParamsStreaming,
            completion_create_params.CompletionCreateParamsNonStreaming,
        ),
        CHAT: keys(chat_params.CompletionCreateParamsStreaming, chat_params.CompletionCreateParamsNonStreaming),
        EMBEDDINGS: keys(embedding_create_params.EmbeddingCreateParams),
    }


def test_every_field_of_the_openai_client_is_classified():
    """A field a new openai client sends shows up here until the table says what it does."""
    for endpoint, names in _openai_fields().items():
        missing = sorted(n for n in names if n not in FIELDS or endpoint not in FIELDS[n].endpoints)
        assert not missing, f"{endpoint}: fields not in openai_api.FIELDS: {missing}"
    extras = {f.name for f in REQUEST_FIELDS} | set(TOP_LEVEL) | {"structured_outputs"}
    assert extras <= set(FIELDS), sorted(extras - set(FIELDS))
    assert set(STRUCTURED_OUTPUTS.values()) <= {f.option for f in REQUEST_FIELDS}
    for name, rule in FIELDS.items():
        assert rule.status in (HONOURED, NO_EFFECT, REFUSED) and rule.why, name
        assert rule.neutral is None or rule.status == REFUSED, name


def test_the_docs_show_the_table():
    text = (ROOT / "docs" / "server.md").read_text()
    assert fields_table() in text, "docs/server.md's field table is stale: paste fields_table() there"


def test_refused_fields_name_themselves_and_neutral_values_pass(server):
    refused = {name: rule for name, rule in FIELDS.items() if rule.status == REFUSED}
    assert {"best_of", "suffix", "audio", "modalities", "web_search_options"} <= set(refused)
    for name, rule in refused.items():
        path = "/v1/completions" if COMPLETIONS in rule.endpoints else "/v1/chat/completions"
        body = {"prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
        status, _, reply = request(server, "POST", path, {**body, name: {"something": 1}})
        assert status == 400, name
        assert_error(reply, param=name)
        assert name in reply["error"]["message"] and rule.why in reply["error"]["message"]
        if rule.neutral is not None:
            assert request(server, "POST", path, {**body, name: rule.neutral})[0] == 200, name
    no_effect = {
        "user": "u-1",
        "store": True,
        "metadata": {"a": "b"},
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "parallel_tool_calls": True,
        "safety_identifier": "x",
        "prediction": {"type": "content", "content": "hi"},
    }
    messages = [{"role": "user", "content": PROMPT}]
    plain = request(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
    status, _, reply = request(
        server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0, **no_effect}
    )
    assert status == 200 and reply["choices"][0]["message"] == plain[2]["choices"][0]["message"]


def test_unknown_fields_are_logged_once_per_name(server, caplog):
    name = "no_such_field_" + str(id(caplog))
    with caplog.at_level(logging.WARNING, logger="pocketlm.server"):
        for _ in range(3):
            status, _, _ = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, name: 1})
            assert status == 200
    assert sum(name in r.getMessage() for r in caplog.records) == 1


# -- echo and prompt log-probabilities (item 1) -------------------------------------------------
def test_echo_logprobs_are_the_model_s_own(client, model):
    ids = model.tokenize(PROMPT)
    out = client.completions.create(
        model="tiny", prompt=[ids], echo=True, logprobs=2, max_tokens=3, temperature=0, seed=1234
    )
    choice = out.choices[0]
    lp = choice.logprobs
    alone = model.generate(ids, max_new_tokens=3, logprobs=2)
    shown = [t for t in alone.token_ids if not model.engine.is_end(t)]
    assert len(lp.tokens) == len(ids) + len(shown)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = expected_prompt_logprobs(model, ids)
    assert np.allclose(lp.token_logprobs[1 : len(ids)], expected, atol=1e-5)
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= value
    # the generated tokens follow, as a request without echo gets them
    assert [round(v, 5) for v in lp.token_logprobs[len(ids) :]] == [round(x.logprob, 5) for x in alone.logprobs]
    assert choice.text == PROMPT + alone.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens[: len(ids)]) == PROMPT


def test_prompt_logprobs_stream_in_bounded_batches_and_equal_the_logits(model, monkeypatch):
    """Model.prompt_logprobs (what echo returns) takes the rows as llama.cpp hands them out, in
    batches cut to ALL_LOGITS_BYTES, never the prompt's [n, vocab] at once; they are the
    log-softmax of model.logits()."""
    import pocketlm.backends.llama_common as llama_common

    ids = model.tokenize(" ".join(PROMPTS * 6))[:200]
    expected = logprobs_of(model.logits(ids)[:-1], ids[1:], 3)
    calls = []
    decode = model.engine._s.llama.llama_decode

    def counted(ctx, batch):
        calls.append(batch.n_tokens)
        return decode(ctx, batch)

    monkeypatch.setattr(llama_common, "ALL_LOGITS_BYTES", 7 * 4 * model.info.vocab_size)  # 7 rows a batch
    monkeypatch.setattr(model.engine._s.llama, "llama_decode", counted)
    got = model.prompt_logprobs(ids, 3)
    assert calls and max(calls) <= 7 and sum(calls) == len(ids)
    assert [g.token_id for g in got] == ids[1:]
    for g, e in zip(got, expected):
        assert abs(g.logprob - e.logprob) < 1e-4 and [t for t, _ in g.top] == [t for t, _ in e.top]


def test_echo_with_max_tokens_0_is_the_prompt_alone(server, model):
    status, _, reply = request(
        server, "POST", "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0}
    )
    assert status == 200, reply
    choice = reply["choices"][0]
    ids = model.tokenize(PROMPT)
    assert choice["text"] == PROMPT and len(choice["logprobs"]["tokens"]) == len(ids)
    assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(ids) - 1)
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # without echo, 0 new tokens is still refused
    assert request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})[0] == 400


def test_lm_eval_loglikelihood_request_scores_as_the_model(server, model):
    """lm-eval 0.4.13 local-completions' exact loglikelihood request, two prompts at once (its
    --batch_size 2), parsed by lm-eval's own parser: each continuation's log-likelihood equals
    Model.score, and greediness matches the model's argmax."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    cases = [(PROMPT, " Je"), ("What is the capital of France?", " Paris, of course")]
    prompts, ctxlens = [], []
    for context, continuation in cases:
        ctx, cont = model.tokenize(context), model.tokenize(continuation)
        prompts.append(ctx + cont)
        ctxlens.append(len(ctx))
    body = {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234}
    status, _, reply = request(server, "POST", "/v1/completions", {"model": "tiny", **body})
    assert status == 200, reply
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    parsed = LocalCompletionsAPI.parse_logprobs(reply, ctxlens=ctxlens)
    for (context, continuation), (ll, greedy), ids, n in zip(cases, parsed, prompts, ctxlens):
        assert ll == pytest.approx(model.score(context, [continuation])[0], abs=1e-3)
        rows = model.logits(ids)[n - 1 : -1]
        assert greedy == all(int(np.argmax(r)) == t for r, t in zip(rows, ids[n:]))
    # a continuation made of the model's greedy tokens is greedy to lm-eval too
    ctx = model.tokenize(PROMPT)
    cont = model.generate(ctx, max_new_tokens=3, min_new_tokens=3).token_ids
    status, _, reply = request(server, "POST", "/v1/completions", {**body, "prompt": [ctx + cont]})
    assert LocalCompletionsAPI.parse_logprobs(reply, ctxlens=[len(ctx)])[0][1] is True


def test_echo_streamed_equals_whole(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[:2], echo=True, logprobs=1, max_tokens=4, temperature=0)
    whole = client.completions.create(**kwargs)
    texts, tokens, values = ["", ""], [[], []], [[], []]
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs:
                tokens[c.index] += c.logprobs.tokens
                values[c.index] += c.logprobs.token_logprobs
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert values == [c.logprobs.token_logprobs for c in whole.choices]


def test_echo_beside_running_streams_leaves_them_intact(parallel, model):
    """Prompts scored for echo while other requests decode in the same small KV cache: every
    stream gets what it gets alone, every score is the model's (within 1e-3, the issue's bound)."""
    m, s = parallel
    expected = {p: model.generate(p, max_new_tokens=60).text for p in PROMPTS}
    ids = model.tokenize(PROMPTS[0] * 6)
    scores = expected_prompt_logprobs(model, ids)

    def stream(prompt: str) -> str:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            body = dict(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in c.completions.create(**body))

    def echo(_: int) -> list[float]:
        body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
        status, _, reply = request(s, "POST", "/v1/completions", body)
        assert status == 200, reply
        return reply["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, p) for p in PROMPTS]
        echoes = [pool.submit(echo, i) for i in range(6)]
        for p, f in zip(PROMPTS, streams):
            assert f.result(timeout=300) == expected[p], p
        for f in echoes:  # the cells beside other sequences' change llama.cpp's sums: 5e-4 seen here
            assert np.allclose(f.result(timeout=300), scores, atol=1e-3)


# -- several prompts per request (item 2) ------------------------------------------------------
def test_greedy_batch_returns_what_each_prompt_gets_alone(client, model):
    ids = model.tokenize("Tell me a story.")
    for prompt in (PROMPTS, [model.tokenize(p) for p in PROMPTS] + [ids]):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        alone = [model.generate(p, max_new_tokens=8) for p in prompt]
        assert [c.index for c in out.choices] == list(range(len(prompt)))
        assert [c.text for c in out.choices] == [r.text for r in alone]
        assert [c.finish_reason for c in out.choices] == [r.finish_reason for r in alone]
        assert out.usage.prompt_tokens == sum(r.prompt_tokens for r in alone)
        assert out.usage.completion_tokens == sum(len(r.token_ids) for r in alone)


def test_n_per_prompt_indexed_as_openai(client, model):
    """Prompt i's j-th choice is at index i*n + j, the j-th sample of that prompt alone."""
    out = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=5, n=3, temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == list(range(6))
    for i, p in enumerate(PROMPTS[:2]):
        alone = model.generate(p, max_new_tokens=5, temperature=1.0, seed=7, num_return_sequences=3)
        assert [c.text for c in out.choices[i * 3 : i * 3 + 3]] == [r.text for r in alone.sequences]


def test_several_prompts_streamed_equal_whole(client):
    kwargs = dict(model="tiny", prompt=PROMPTS, max_tokens=6, n=2, temperature=0.8, seed=3)
    whole = client.completions.create(**kwargs)
    texts, finishes = [""] * 6, {}
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        if chunk.usage:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert texts == [c.text for c in whole.choices]
    assert finishes == {c.index: c.finish_reason for c in whole.choices}


def test_several_prompts_decode_together(parallel, model):
    """On a model decoding 4 at once, 3 prompts in one request take fewer engine steps than one
    after the other, and still get what each gets alone."""
    m, s = parallel
    alone = [model.generate(p, max_new_tokens=10).text for p in PROMPTS]
    before = m.scheduler.steps
    body = {"prompt": PROMPTS, "max_tokens": 10, "temperature": 0}
    status, _, reply = request(s, "POST", "/v1/completions", body)
    assert status == 200 and [c["text"] for c in reply["choices"]] == alone
    assert m.scheduler.steps - before < 2 * 10


def test_too_many_prompts_is_a_400_and_a_full_queue_a_429(model):
    """Each prompt is a request to the scheduler's admission: more than can ever wait beside the
    running ones is a 400; more than fit now, a 429."""
    with running(SlowModel(model, 0.05), max_queue=1, model_name="tiny") as s:  # parallel 1: 2 at once
        status, _, reply = request(s, "POST", "/v1/completions", {"prompt": PROMPTS, "max_tokens": 1})
        assert status == 400
        assert_error(reply, param="prompt")
        assert "--max-queue 1" in reply["error"]["message"]
        assert request(s, "POST", "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 1})[0] == 200
        busy = stream_request(s.port, 200)  # one running, so one place to wait
        try:
            status, headers, reply = request(s, "POST", "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 1})
            assert status == 429 and headers["Retry-After"] == "1"
            assert_error(reply)
        finally:
            hard_close(busy)
    model.scheduler.max_waiting = 64  # the module's server shares the model (and its queue)


def test_langchain_batch_sends_one_request_and_gets_each_answer(server, model):
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=server.url + "/v1", api_key="x", model="tiny", max_tokens=6, temperature=0, max_retries=0)
    assert llm.batch(PROMPTS) == [model.generate(p, max_new_tokens=6).text for p in PROMPTS]


# -- embeddings (item 3) --------------------------------------------------------------------
def test_embeddings_through_the_openai_client(client, model):
    ids = model.tokenize(PROMPTS[1])
    for inputs in (PROMPTS[0], PROMPTS, ids, [ids, model.tokenize(PROMPTS[2])]):
        expected = model.embed(inputs)
        for encoding in ("float", "base64"):
            out = client.embeddings.create(model="tiny", input=inputs, encoding_format=encoding)
            if encoding == "base64":  # asked explicitly, the client hands the text over as it came
                got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in out.data])
            else:
                got = np.array([d.embedding for d in out.data], dtype=np.float32)
            assert [d.index for d in out.data] == list(range(len(got)))
            assert np.array_equal(got, expected.vectors), encoding
            assert out.usage.prompt_tokens == out.usage.total_tokens == expected.tokens
            assert out.model == "tiny" and out.object == "list"
    # the client's default asks base64 and decodes it itself
    default = client.embeddings.create(model="tiny", input=PROMPTS[0])
    assert np.array_equal(np.array(default.data[0].embedding, dtype=np.float32), model.embed(PROMPTS[0]).vectors[0])


def test_embeddings_raw_shape_and_refusals(server, model):
    status, _, reply = request(server, "POST", "/v1/embeddings", {"input": PROMPTS[0], "encoding_format": "base64"})
    assert status == 200 and set(reply) == {"object", "data", "model", "usage"}
    raw = base64.b64decode(reply["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, "<f4"), model.embed(PROMPTS[0]).vectors[0])
    dim = len(np.frombuffer(raw, "<f4"))
    assert request(server, "POST", "/v1/embeddings", {"input": "a b.", "dimensions": dim})[0] == 200
    for body, param in [
        ({"input": "a b.", "dimensions": dim // 2}, "dimensions"),
        ({"input": "a b.", "encoding_format": "int8"}, "encoding_format"),
        ({"input": []}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": ""}, "input"),
        ({"input": [[1, 2], [10**6]]}, "input"),
        ({}, "input"),
    ]:
        status, _, reply = request(server, "POST", "/v1/embeddings", body)
        assert status == 400, body
        assert_error(reply, param=param)
        assert "\n" not in reply["error"]["message"]


def test_an_engine_that_cannot_embed_is_one_400(server, monkeypatch):
    from pocketlm.converters.core.errors import RequestError

    def refuse(inputs):
        raise RequestError("the ctranslate2 engine cannot compute embeddings")

    monkeypatch.setattr(server.model, "embed", refuse)
    status, _, reply = request(server, "POST", "/v1/embeddings", {"input": "hello."})
    assert status == 400 and reply["error"]["message"] == "the ctranslate2 engine cannot compute embeddings"


def test_langchain_openai_embeddings(server, model, built):
    """LangChain's OpenAIEmbeddings as its docs set it for other servers (raw text), and with
    its Hugging Face tokenizer (it sends the text of each chunk of the model's own tokens)."""
    from langchain_openai import OpenAIEmbeddings

    base = dict(base_url=server.url + "/v1", api_key="x", max_retries=0)
    raw = OpenAIEmbeddings(model="tiny", check_embedding_ctx_length=False, **base)
    expected = model.embed(PROMPTS).vectors
    assert np.allclose(raw.embed_documents(PROMPTS), expected, atol=1e-7)
    assert np.allclose(raw.embed_query(PROMPTS[0]), expected[0], atol=1e-7)
    hf = OpenAIEmbeddings(model=str(built[1]), tiktoken_enabled=False, **base)
    assert np.allclose(hf.embed_documents(PROMPTS), expected, atol=1e-6)


# -- /tokenize and /detokenize (item 4) ---------------------------------------------------------
def test_tokenize_in_llama_server_s_and_lm_eval_s_words(server, model, built):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(built[1] / "tokenizer.json"))
    text = "Héllo wörld, 東京 </s> ok"
    expected = hf(text, add_special_tokens=False)["input_ids"]
    for path in ("/tokenize", "/v1/tokenize"):
        for body in (
            {"content": text},
            {"prompt": text, "add_special_tokens": False},
            {"content": text, "add_special": True},
        ):
            status, _, reply = request(server, "POST", path, body)
            assert status == 200 and reply["tokens"] == expected == model.tokenize(text), body
            assert reply["count"] == len(expected) and reply["max_model_len"] == model.info.n_ctx
        status, _, reply = request(server, "POST", path.replace("tokenize", "detokenize"), {"tokens": expected})
        assert status == 200 and reply["content"] == reply["prompt"] == model.detokenize(expected)
    # lm-eval's probe asks exactly this
    status, _, reply = request(server, "POST", "/tokenize", {"prompt": "test", "add_special_tokens": False})
    assert status == 200 and isinstance(reply["tokens"], list)


def test_with_pieces_as_llama_server(server, model):
    broken = next(t for t in range(model.info.vocab_size) if _invalid_utf8(model.token_bytes(t)))
    text = model.detokenize([5, 17, 250]) + "é"
    status, _, reply = request(server, "POST", "/tokenize", {"content": text, "with_pieces": True})
    assert status == 200
    ids = model.tokenize(text)
    assert [t["id"] for t in reply["tokens"]] == ids
    for t in reply["tokens"]:
        data = model.token_bytes(t["id"])
        assert t["piece"] == (list(data) if _invalid_utf8(data) else data.decode())
    from pocketlm.serving.openai_api import piece

    assert piece(model.token_bytes(broken)) == list(model.token_bytes(broken))


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_tokenize_refusals(server, model):
    for path, body, param in [
        ("/tokenize", {}, "content"),
        ("/tokenize", {"content": 3}, "content"),
        ("/tokenize", {"content": "a", "prompt": "b"}, "prompt"),
        ("/tokenize", {"content": "a", "add_special": True, "add_special_tokens": False}, "add_special_tokens"),
        ("/tokenize", {"content": "a", "parse_special": False}, "parse_special"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [1, model.info.vocab_size]}, "tokens"),
    ]:
        status, _, reply = request(server, "POST", path, body)
        assert status == 400, body
        assert_error(reply, param=param)


# -- an encoder-decoder ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["gguf", "ct2"])
def t5(request, tmp_path_factory, t5_tokenizer_files):
    """A T5 on llama.cpp and on CTranslate2 (whose scheduler forms batches itself)."""
    folder = tmp_path_factory.mktemp("t5")
    make_t5(folder / "hf", vocab=300, tokenizer_files={"tokenizer.json": t5_tokenizer_files["tokenizer.json"]})
    quant = "f32" if request.param == "gguf" else "float32"
    path = pocketlm.convert(folder / "hf", folder / f"m.{request.param}", format=request.param, quant=quant).output
    with pocketlm.load(path, n_ctx=256, threads=1) as m, running(m, max_tokens_limit=16, model_name="t5") as s:
        yield m, s


def test_t5_refuses_echo_in_one_line_and_tokenizes_as_transformers(t5, hf_t5_tokenizer):
    m, s = t5
    for stream in (False, True):
        body = {"prompt": "translate: a b c.", "echo": True, "logprobs": 1, "max_tokens": 1, "stream": stream}
        status, _, reply = request(s, "POST", "/v1/completions", body)
        assert status == 400
        assert_error(reply, param="echo")
        assert "encoder-decoder" in reply["error"]["message"] and "pocketlm eval" in reply["error"]["message"]
    text = "translate English to German: the house is small."
    for add in (False, True):
        status, _, reply = request(s, "POST", "/tokenize", {"content": text, "add_special": add})
        assert status == 200 and reply["tokens"] == hf_t5_tokenizer(text, add_special_tokens=add)["input_ids"]
    # several prompts decode together on T5 too, each as alone
    status, _, reply = request(s, "POST", "/v1/completions", {"prompt": PROMPTS, "max_tokens": 5, "temperature": 0})
    assert status == 200
    assert [c["text"] for c in reply["choices"]] == [m.generate(p, max_new_tokens=5).text for p in PROMPTS]


def test_the_refusal_text_is_one_line():
    assert "\n" not in openai_api.ECHO_REFUSED and re.search(r"pocketlm eval", openai_api.ECHO_REFUSED)


def test_lm_eval_local_completions_matches_lm_eval_s_hf_model(server, built):
    """lm-eval's `local-completions` model (token-id prompts, two requests per call) against the
    server scores and generates as lm-eval's `hf` model on the checkpoint the GGUF came from."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    pairs = [(PROMPT, " Je t'aime"), (PROMPTS[1], " Paris."), (PROMPTS[1], " Rome."), (PROMPTS[2], " blue")]
    scored = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    until = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    generated = [Instance("generate_until", {}, (p, dict(until)), i) for i, p in enumerate(PROMPTS)]
    served = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model="tiny",
        tokenizer=str(built[1]),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        batch_size=2,
        max_retries=1,
    )
    from transformers import PreTrainedTokenizerFast

    # the random checkpoint's tokenizer.json names no special token: HFLM needs its end of text
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(built[1] / "tokenizer.json"))
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(
        json.loads((built[1] / "config.json").read_text())["eos_token_id"]
    )
    reference = HFLM(pretrained=str(built[1]), tokenizer=tokenizer, batch_size=2, device="cpu", dtype="float32")
    got, expected = served.loglikelihood(scored), reference.loglikelihood(scored)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, expected):
        assert ll == pytest.approx(ref_ll, abs=1e-3) and greedy == ref_greedy
    generated_copy = [Instance("generate_until", {}, (p, dict(until)), i) for i, p in enumerate(PROMPTS)]
    assert served.generate_until(generated) == reference.generate_until(generated_copy)

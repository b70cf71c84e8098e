"""Structured output through the server (issue 27): OpenAI's response_format and tools, vLLM's
structured_outputs and guided_* fields, llama-server's json_schema and grammar, logit_bias, on
the tiny random BLOOM (f32), through raw HTTP, the official `openai` client and LangChain. Every
output is checked against what it was held to; what cannot be honoured is one 400 naming its field."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest
from reference import make_t5
from test_constraints import GBNF, LABELS, REGEX, SCHEMA
from test_server import assert_error, request, running, tiny_gguf

import pocketlm
from pocketlm.converters.core.errors import RequestError
from pocketlm.core.generation import TokenStream
from pocketlm.serving.openai_api import AUTO_REFUSED, chat_prompt

PROMPT = "Review: this movie was great! Is this review positive or negative?"
MESSAGES = [{"role": "user", "content": PROMPT}]
SAMPLED = {"temperature": 1.0, "seed": 7, "n": 3}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
RATE = {
    "type": "function",
    "function": {"name": "rate", "description": "Rate a review.", "parameters": SCHEMA},
}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "rate": SCHEMA}


class Review(pydantic.BaseModel):
    """A review's label and score."""

    label: Literal["positive", "negative", "neutral"]
    score: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pocketlm.load(tiny_gguf(tmp_path_factory.mktemp("structured"), "f32"), n_ctx=2048, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    with running(model, max_tokens_limit=128, model_name="tiny") as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat(server, **body: Any) -> tuple[int, dict[str, Any]]:
    status, _, reply = request(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, **body})
    return status, reply


def texts(reply: dict[str, Any]) -> list[str]:
    choices = reply["choices"]
    assert all(c["finish_reason"] == "stop" for c in choices), choices  # every constraint completed
    return [c["message"]["content"] if "message" in c else c["text"] for c in choices]


def tool_calls(server, **body: Any) -> list[tuple[str, str, str]]:
    """(finish reason, function name, arguments text) of each choice of a whole response."""
    status, _, reply = request(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 200, reply
    out = []
    for c in reply["choices"]:
        message = c["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1, message
        call = message["tool_calls"][0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        out.append((c["finish_reason"], call["function"]["name"], call["function"]["arguments"]))
    return out


def stream_calls(client, **kw: Any) -> list[tuple[str, str, str]]:
    """The same through the client's stream: each choice's call comes as one delta."""
    calls: dict[int, list[Any]] = {}
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kw):
        for c in chunk.choices:
            entry = calls.setdefault(c.index, [None, None, None])
            assert not c.delta.content  # no text: the call is whole at the end
            if c.delta.tool_calls:
                (call,) = c.delta.tool_calls
                assert call.index == 0 and call.type == "function" and call.id.startswith("call_")
                entry[1:] = [call.function.name, call.function.arguments]
            if c.finish_reason:
                entry[0] = c.finish_reason
    return [tuple(calls[i]) for i in sorted(calls)]


def check_calls(calls: list[tuple[str, str, str]], names: set[str]) -> None:
    for finish, name, arguments in calls:
        assert finish == "tool_calls" and name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# -- OpenAI's response_format, through the official client ------------------------------------
def test_response_format_json_schema_greedy_and_sampled(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}
    for extra in ({"temperature": 0}, SAMPLED):
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, **extra)
        assert len(reply.choices) == extra.get("n", 1)
        for c in reply.choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_response_format_json_object(client, model):
    """Any JSON object. A random model writes strings forever, so "}" is favoured here (which
    also shows logit_bias and a constraint together); unbiased, the output still opens one."""
    close = model.tokenize("}")
    assert len(close) == 1
    fmt = {"type": "json_object"}
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=fmt, logit_bias={str(close[0]): 8}, max_tokens=60, **SAMPLED
    )
    for c in reply.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict)
    plain = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=8, temperature=0
    )
    assert plain.choices[0].message.content.startswith("{")
    text = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format={"type": "text"}, max_tokens=8, temperature=0
    )
    assert text.choices[0].message.content == model.generate(PROMPT, max_new_tokens=8).text


def test_client_parse_returns_the_pydantic_object(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    reply = parse(model="tiny", messages=MESSAGES, response_format=Review, temperature=0)
    assert isinstance(reply.choices[0].message.parsed, Review)


# -- vLLM's and llama-server's spellings ------------------------------------------------------
@pytest.mark.parametrize(
    "body, matches",
    [
        ({"structured_outputs": {"choice": LABELS}}, lambda t: t in LABELS),
        ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t)),
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"structured_outputs": {"grammar": GBNF}}, lambda t: re.fullmatch(r"(yes|no) [a-f]", t)),
        ({"guided_choice": LABELS}, lambda t: t in LABELS),
        ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"grammar": GBNF}, lambda t: re.fullmatch(r"(yes|no) [a-f]", t)),
        ({"grammar": 'start: ("yes" | "no") " " /[a-f]/'}, lambda t: re.fullmatch(r"(yes|no) [a-f]", t)),
        ({"json_schema": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
        ({"choice": LABELS}, lambda t: t in LABELS),
        ({"response_format": {"type": "json_object", "schema": SCHEMA}}, lambda t: json.loads(t)["label"] in LABELS),
    ],
)
def test_every_spelling_holds_greedy_and_sampled(server, body, matches):
    for path, extra in [("/v1/chat/completions", {"temperature": 0}), ("/v1/completions", SAMPLED)]:
        payload = {"messages": MESSAGES, "prompt": PROMPT, "max_tokens": 64, **extra, **body}
        status, _, reply = request(server, "POST", path, payload)
        assert status == 200, reply
        got = texts(reply)
        assert len(got) == extra.get("n", 1)
        for text in got:
            assert matches(text), text


def test_constraints_stream_as_text(client):
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, temperature=0, extra_body={"guided_regex": REGEX}
        )
        if c.choices
    ]
    assert re.fullmatch(REGEX, "".join(pieces))


@pytest.mark.parametrize(
    "body, names, param",
    [
        (
            {"response_format": {"type": "json_object"}, "guided_choice": LABELS},
            ["response_format", "guided_choice"],
            "guided_choice",
        ),
        (
            {"structured_outputs": {"choice": LABELS, "regex": REGEX}},
            ["structured_outputs.regex", "structured_outputs.choice"],
            "structured_outputs",
        ),
        ({"grammar": GBNF, "tools": [WEATHER], "tool_choice": "required"}, ["grammar", "tools"], "tools"),
    ],
)
def test_two_constraints_are_one_400_naming_both(server, body, names, param):
    status, reply = chat(server, **body)
    assert status == 400
    assert_error(reply, param=param)
    message = reply["error"]["message"]
    assert "\n" not in message and all(f"'{n}'" in message for n in names), message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}, "json_schema"),
        ({"grammar": "root ::= undefined_rule"}, "grammar"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"guided_choice": "positive"}, "guided_choice"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
    ],
)
def test_invalid_constraints_are_400_naming_the_field(server, body, param):
    for stream in (False, True):
        status, reply = chat(server, stream=stream, **body)
        assert status == 400, reply
        assert_error(reply, param=param)
        assert "\n" not in reply["error"]["message"]


# -- logit_bias -------------------------------------------------------------------------------
def test_logit_bias_plus_100_makes_greedy_output_that_token(client, model):
    token = model.tokenize(" yes")[-1]
    word = model.token_bytes(token).decode()
    assert model.generate(PROMPT, max_new_tokens=3).text != word * 3  # not what it says anyway
    reply = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert reply.choices[0].text == word * 3
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert reply.choices[0].message.content == word * 3


@pytest.mark.parametrize("bias", [{"100000": 5}, {"-1": 5}, {"7": 101}, {"x": 1}, [7, 5]])
def test_logit_bias_out_of_range_is_400(server, bias):
    status, reply = chat(server, logit_bias=bias, max_tokens=2)
    assert status == 400, reply
    assert_error(reply, param="logit_bias")


# -- tools ------------------------------------------------------------------------------------
def test_tool_choice_required_calls_one_of_the_tools(server, client):
    tools = [WEATHER, RATE]
    for extra in ({"temperature": 0}, SAMPLED):
        calls = tool_calls(server, tools=tools, tool_choice="required", **extra)
        assert len(calls) == extra.get("n", 1)
        check_calls(calls, {"get_weather", "rate"})
        streamed = stream_calls(client, tools=tools, tool_choice="required", **extra)
        check_calls(streamed, {"get_weather", "rate"})
        if extra.get("temperature") == 0:
            assert [(f, n, json.loads(a)) for f, n, a in streamed] == [(f, n, json.loads(a)) for f, n, a in calls]


def test_named_function_calls_that_function(server, client):
    named = {"type": "function", "function": {"name": "rate"}}
    for extra in ({"temperature": 0}, SAMPLED):
        check_calls(tool_calls(server, tools=[WEATHER, RATE], tool_choice=named, **extra), {"rate"})
        check_calls(stream_calls(client, tools=[WEATHER, RATE], tool_choice=named, **extra), {"rate"})
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice=named | {"function": {"name": "get_weather"}}
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and reply.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def test_a_call_cut_short_comes_back_as_text(server, client):
    status, reply = chat(server, tools=[WEATHER], tool_choice="required", max_tokens=3, temperature=0)
    (choice,) = reply["choices"]
    assert status == 200 and choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    text = choice["message"]["content"]
    assert text.startswith("{") and len(text) > 1
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=3,
        temperature=0,
        stream=True,
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == text
    assert chunks[-1].finish_reason == "length" and not any(c.delta.tool_calls for c in chunks)


def test_tool_choice_none_and_no_tools_are_text(server, model):
    status, reply = chat(server, tools=[WEATHER], tool_choice="none", max_tokens=5, temperature=0)
    assert status == 200 and reply["choices"][0]["message"]["content"] == model.generate(PROMPT, max_new_tokens=5).text
    assert reply["choices"][0]["finish_reason"] == "length" and "tool_calls" not in reply["choices"][0]["message"]


@pytest.mark.parametrize("choice", ["auto", None])
def test_tool_choice_auto_is_refused_in_one_line(server, client, choice):
    body = {"tools": [WEATHER], **({"tool_choice": choice} if choice else {})}
    status, reply = chat(server, **body)
    assert status == 400
    assert_error(reply, param="tool_choice")
    assert reply["error"]["message"] == AUTO_REFUSED and "\n" not in AUTO_REFUSED
    assert '"required"' in AUTO_REFUSED and '"none"' in AUTO_REFUSED
    with pytest.raises(openai.BadRequestError, match="not trained to decide"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER])


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [WEATHER["function"]]}, "functions"),
    ],
)
def test_bad_tool_requests_are_400(server, body, param):
    status, reply = chat(server, **body)
    assert status == 400
    assert_error(reply, param=param)


def test_tool_messages_go_into_the_transcript(server, client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Snow, -3 C."},
        {"role": "user", "content": "And is it cold?"},
    ]
    assert chat_prompt(messages) == (
        'Be brief.\n\nUser: Weather in Oslo?\nAssistant: call get_weather({"city": "Oslo"})\n'
        "Tool (get_weather): Snow, -3 C.\nUser: And is it cold?\nAssistant:"
    )
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    # and a forced call after a tool's answer
    calls = tool_calls(server, messages=messages, tools=[WEATHER], tool_choice="required", temperature=0)
    check_calls(calls, {"get_weather"})


def test_forced_call_prompt_describes_the_tools():
    from pocketlm.serving.openai_api import Tools

    tools = Tools({"rate": {"description": "Rate a review.", "parameters": SCHEMA}})
    prompt = chat_prompt(MESSAGES, tools)
    assert prompt.endswith("\n\n" + PROMPT) and "- rate: Rate a review.; arguments: " in prompt


# -- a vocabulary that cannot write JSON (T5) -------------------------------------------------
@pytest.fixture(scope="module")
def t5_server(tmp_path_factory, t5_tokenizer_files):
    folder = tmp_path_factory.mktemp("t5")
    make_t5(folder / "hf", vocab=300, tokenizer_files={"tokenizer.json": t5_tokenizer_files["tokenizer.json"]})
    path = pocketlm.convert(folder / "hf", folder / "m.gguf", format="gguf", quant="f32").output
    with pocketlm.load(path, n_ctx=1024, threads=1) as m, running(m, max_tokens_limit=64, model_name="t5") as s:
        yield s


def test_json_on_t5_is_one_400_naming_the_missing_characters(t5_server):
    for body, param in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": "required"}, "tools"),
    ]:
        for stream in (False, True):
            status, reply = chat(t5_server, stream=stream, **body)
            assert status == 400, reply
            assert_error(reply, param=param)
            message = reply["error"]["message"]
            assert "'{'" in message and "\n" not in message, message


# -- LangChain ------------------------------------------------------------------------------
def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", temperature=0)
    for method in ("json_schema", "function_calling"):
        parsed = llm.with_structured_output(Review, method=method).invoke(PROMPT)
        assert isinstance(parsed, Review), (method, parsed)


# -- a constraint's dead end met while streaming -----------------------------------------------
class DeadEndModel:
    """The real model, whose stream meets a constraint's dead end after its first event (as a
    constraint the vocabulary could not be proved unable to write does)."""

    def __init__(self, model: Any):
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def stream_tokens(self, *args: Any, **kwargs: Any) -> TokenStream:
        inner = self._model.stream_tokens(*args, **kwargs)

        def first_then_dead_end() -> Any:
            with contextlib.closing(inner):
                yield next(iter(inner))
            raise RequestError("regex: this model's vocabulary cannot write '0', which the constraint needs here")

        return TokenStream(first_then_dead_end(), inner.result)


def test_a_dead_end_met_while_streaming_is_the_request_s_error(model):
    with running(DeadEndModel(model), max_tokens_limit=64, model_name="tiny") as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"messages": MESSAGES, "stream": True, "regex": "[a-z ]{1,40}", "max_tokens": 30}
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        conn.close()
    assert response.status == 200  # the first event was sent before the dead end
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert len(errors) == 1 and errors[0]["type"] == "invalid_request_error", errors
    assert errors[0]["param"] == "regex" and "'0'" in errors[0]["message"]

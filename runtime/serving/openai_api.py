"""OpenAI's API as data: a completion or chat request checked into a prompt and
GenerationOptions, and the response objects (whole, streamed chunks, log-probabilities).
No HTTP here: runtime/serving/app.py serves these, runtime/serving/http.py carries them.

Sampling follows OpenAI's API, not PocketLM's CLI: `temperature` defaults to 1.0 (send 0 for
greedy decoding); `max_tokens` defaults to 16 for completions and to the server's limit for
chat. `n` (up to 16 choices), `logprobs` (completions: the number of alternatives; chat:
`logprobs: true` with `top_logprobs`), `presence_penalty` and `frequency_penalty` have
OpenAI's meaning; `top_k`, `repetition_penalty`, `no_repeat_ngram_size` and beam search
(`num_beams`, `length_penalty`, `early_stopping`: transformers' meaning; `n` beams come back;
temperature defaults to 0 with beams) are accepted as extras. Log-probabilities are the
model's own, before penalties and temperature. `logit_bias` has OpenAI's meaning (token id
strings to -100..100, added to the logits first; an id outside the vocabulary is a 400).
Every request field is classified in one table, `FIELDS` (honoured, accepted with no effect and
why, or refused unless it holds its neutral value: a 400 naming it); a field no version of the
API has is ignored and logged once per name. What one request may ask (tokens, stop strings,
choices, beams, alternatives, prompt length, embeddings inputs) is bounded by `Limits`; a
request over one gets a 400 naming the limit.

A completion's `prompt` may hold several prompts (strings, or token-id lists): prompt i's j-th
choice is at index i*n+j. `echo` returns the prompt before the output; with `logprobs`, its
tokens' log-probabilities (`Echo`; the first token's is null) come before the generated ones,
in OpenAI's legacy shape, and `max_tokens` may be 0. An encoder-decoder refuses echo
(`ECHO_REFUSED`). Embeddings requests (`parse_embeddings`, `embeddings_reply`) and llama-server's
and vLLM's /tokenize and /detokenize (`parse_tokenize`, `parse_detokenize`) are read here too.

The options a request may set are GenerationOptions' fields, named as their metadata says
(`REQUEST_FIELDS`: `max_tokens`, `n`, the others by their own names); each is read as its JSON
type, or by one of `READERS` where OpenAI's meaning needs more (defaults, limits, aliases).
Transformers' search options a request leaves out take the model's generation defaults; the
others, PocketLM's (OpenAI's) defaults.

Structured output: the constraint fields (json_schema, regex, choice, grammar) are read together
by `read_constraint`, from whichever spelling a request uses: OpenAI's `response_format`
(`text`; `json_object`, any JSON object; `json_schema` with its `schema`), vLLM's
`structured_outputs` (one of `choice`, `regex`, `json`, `grammar`; `json_object`) and older
`guided_json`/`guided_regex`/`guided_choice`/`guided_grammar`, llama-server's top-level
`json_schema` and `grammar` (GBNF; Lark is accepted too), top-level `regex` and `choice`, and a
forced tool call. Two of them in one request are one 400 naming both. A schema, regex or grammar
that does not compile, or that the model's vocabulary cannot write (JSON on T5), is a 400 with
the model's one-line reason and `param` the field the request used.

Tool calls (chat): `tools` are OpenAI's function tools. `tool_choice: "required"` holds the
output to a call of one of them, the JSON `{"name": NAME, "arguments": ARGUMENTS}` under each
function's `parameters` schema (`Tools.schema`); a named function, `{"type": "function",
"function": {"name": ...}}`, to its arguments alone. The reply is OpenAI's: `message.tool_calls`
(one call per choice, whatever `parallel_tool_calls` says; `content` null) and
`finish_reason: "tool_calls"`; a stream holds the text back and sends each choice's call as one
`delta.tool_calls` chunk at the end. An output that is not a whole call (cut by `max_tokens` or
a stop string) comes back as text with its finish reason. `tool_choice: "none"` is plain text.
`"auto"`, also OpenAI's default when tools are given, is refused (`AUTO_REFUSED`): these models
were not trained to decide whether to call a tool, and a grammar allowing text or a call would
leave that choice to chance.

Chat prompts: these are instruction models without a chat template. A lone user message
(after optional system messages) is sent as `system + "\\n\\n" + user`, or the bare user text;
longer conversations become a transcript `"{system}\\n\\nUser: ...\\nAssistant: ...\\nUser:
...\\nAssistant:"`. An assistant turn's tool calls are lines `call NAME(ARGUMENTS)` after its
text; a tool's result (`role: "tool"`, or the older `"function"`) is `Tool (NAME): RESULT`, NAME
found from its `tool_call_id` among the calls before it. A forced tool call adds to the system
text a line asking for the call (or the named function's arguments) as JSON, then one line per
function offered: `- NAME: DESCRIPTION; arguments: PARAMETERS` (`Tools.instructions`).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import secrets
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pocketlm.converters.core.errors import PocketLMError
from pocketlm.core.constraints import CONSTRAINTS
from pocketlm.core.engine import Seq2Seq
from pocketlm.core.generation import (
    MAX_SEQUENCES,
    MAX_TOP_LOGPROBS,
    GenerationOptions,
    GenerationResult,
    TokenLogprob,
)
from pocketlm.core.model import Model

log = logging.getLogger("pocketlm.server")

ECHO_REFUSED = (
    "'echo' is not supported for encoder-decoder models: the encoder reads the prompt, nothing scores it; "
    "score continuations in-process with `pocketlm eval` (or Model.score)"
)
TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    str: "a string",
    list: "an array",
    dict: "an object",
}


@dataclass(frozen=True)
class Limits:
    """What one request may cost the shared decode loop. Each field is a `pocketlm serve` flag
    (`--max-tokens` for max_tokens, and so on; `FLAGS`), and a request over one gets a 400
    that names it."""

    max_tokens: int = field(default=2048, metadata={"help": "new tokens per choice"})
    max_prompt_tokens: int | None = field(default=None, metadata={"help": "prompt tokens"})
    max_n: int = field(default=MAX_SEQUENCES, metadata={"help": "choices ('n') of one request"})
    max_beams: int = field(default=MAX_SEQUENCES, metadata={"help": "beams ('num_beams') of one request"})
    max_logprobs: int = field(default=MAX_TOP_LOGPROBS, metadata={"help": "alternatives listed per token"})
    max_stop: int = field(default=16, metadata={"help": "stop strings of one request"})
    max_stop_length: int = field(default=256, metadata={"help": "characters of one stop string"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "bytes of a request body"})
    max_inputs: int = field(default=2048, metadata={"help": "inputs of one embeddings request (OpenAI's limit)"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < (0 if f.name in ("max_logprobs", "max_stop") else 1):
                raise PocketLMError(f"{self.flag(f.name)} {value}: too small")
        if self.max_n > MAX_SEQUENCES or self.max_beams > MAX_SEQUENCES or self.max_logprobs > MAX_TOP_LOGPROBS:
            raise PocketLMError(
                f"--max-n and --max-beams can be at most {MAX_SEQUENCES}, --max-logprobs at most {MAX_TOP_LOGPROBS}"
            )

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def over(self, name: str) -> str:
        """The end of a refusal: which limit, and its flag."""
        return f"(this server's limit, {self.flag(name)} {getattr(self, name)})"


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


# -- which request fields do what ---------------------------------------------------------
HONOURED, NO_EFFECT, REFUSED = "honoured", "accepted, no effect", "refused"
COMPLETIONS, CHAT, EMBEDDINGS = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
GENERATE = (COMPLETIONS, CHAT)


class FieldRule(typing.NamedTuple):
    """What the server does with one request field, and why."""

    status: str  # HONOURED, NO_EFFECT (accepted, changes nothing in the output) or REFUSED
    why: str
    endpoints: tuple[str, ...] = GENERATE  # where it is read
    neutral: Any = None  # REFUSED: the one value accepted besides null (None: only null)


_SAME_NAME = "extra: transformers' meaning (not an OpenAI field)"
_CACHE = "prompt caching is automatic here: a prompt reuses the KV cache of its longest cached prefix"
_WHO = "identifies the end user to OpenAI's abuse monitoring; nothing is kept per user here"
# Every field of OpenAI's completions, chat completions and embeddings requests (a test walks
# the openai client's TypedDicts against it), and the extras PocketLM reads. A REFUSED field
# holding anything but null or its neutral value is a 400 naming it; a field no version of the
# API has is ignored and logged once (`check_fields`). docs/server.md shows this table
# (`fields_table`).
FIELDS: dict[str, FieldRule] = {
    "model": FieldRule(
        NO_EFFECT, "one model is served: any name is answered by it (GET /v1/models names it)", (*GENERATE, EMBEDDINGS)
    ),
    "prompt": FieldRule(
        HONOURED,
        "a string or token ids, or an array of either: several prompts decoded together, prompt i's "
        "j-th choice at index i*n+j",
        (COMPLETIONS,),
    ),
    "messages": FieldRule(HONOURED, "text parts; the transcript's template is in openai_api.py", (CHAT,)),
    "input": FieldRule(HONOURED, "a string, token ids, or an array of either", (EMBEDDINGS,)),
    "max_tokens": FieldRule(
        HONOURED, "default 16 (completions; 0 allowed with echo) or --max-tokens (chat); at most --max-tokens"
    ),
    "max_completion_tokens": FieldRule(HONOURED, "as max_tokens, which it overrides", (CHAT,)),
    "temperature": FieldRule(HONOURED, "default 1; 0 is greedy"),
    "top_p": FieldRule(HONOURED, "nucleus sampling"),
    "n": FieldRule(HONOURED, "choices per prompt, at most --max-n (beams with num_beams)"),
    "seed": FieldRule(HONOURED, "a seeded request samples the same tokens again"),
    "stop": FieldRule(HONOURED, "at most --max-stop strings of --max-stop-length characters"),
    "presence_penalty": FieldRule(HONOURED, "OpenAI's meaning"),
    "frequency_penalty": FieldRule(HONOURED, "OpenAI's meaning"),
    "logit_bias": FieldRule(HONOURED, "token id to -100..100, added to the logits first"),
    "logprobs": FieldRule(
        HONOURED, "completions: that many alternatives (0-20); chat: true, with top_logprobs; the model's own"
    ),
    "top_logprobs": FieldRule(HONOURED, "alternatives per token (0-20), with logprobs true", (CHAT,)),
    "stream": FieldRule(HONOURED, "server-sent events, each choice's chunks carrying its index"),
    "stream_options": FieldRule(HONOURED, "include_usage: a last chunk with the usage"),
    "echo": FieldRule(
        HONOURED,
        "the prompt, and with logprobs its tokens' log-probabilities (the first null), before the generated "
        "ones; max_tokens 0 allowed; causal models only (400 on an encoder-decoder)",
        (COMPLETIONS,),
    ),
    "best_of": FieldRule(REFUSED, "one sample per choice: ask n instead", (COMPLETIONS,), 1),
    "suffix": FieldRule(REFUSED, "these models do not fill in the middle", (COMPLETIONS,), ""),
    "user": FieldRule(NO_EFFECT, _WHO, (*GENERATE, EMBEDDINGS)),
    "safety_identifier": FieldRule(NO_EFFECT, _WHO, (CHAT,)),
    "response_format": FieldRule(HONOURED, "text, json_object or json_schema: structured output"),
    "tools": FieldRule(HONOURED, "function tools, for a forced call (tool_choice)", (CHAT,)),
    "tool_choice": FieldRule(
        HONOURED,
        '"required", a named function, or "none"; "auto" is refused (the models were not trained '
        "to decide whether to call a tool)",
        (CHAT,),
    ),
    "parallel_tool_calls": FieldRule(NO_EFFECT, "one call per choice, whatever it says", (CHAT,)),
    "functions": FieldRule(REFUSED, "deprecated by OpenAI: send tools", (CHAT,), []),
    "function_call": FieldRule(REFUSED, "deprecated by OpenAI: send tool_choice", (CHAT,), "none"),
    "metadata": FieldRule(NO_EFFECT, "tags for stored completions: nothing is stored here", (CHAT,)),
    "store": FieldRule(NO_EFFECT, "nothing is stored here (OpenAI keeps completions for its evals)", (CHAT,)),
    "service_tier": FieldRule(NO_EFFECT, "one tier: every request is served alike", (CHAT,)),
    "prompt_cache_key": FieldRule(NO_EFFECT, _CACHE, (CHAT,)),
    "prompt_cache_options": FieldRule(NO_EFFECT, _CACHE, (CHAT,)),
    "prompt_cache_retention": FieldRule(NO_EFFECT, _CACHE, (CHAT,)),
    "prediction": FieldRule(NO_EFFECT, "a latency hint (predicted output): the output is the same", (CHAT,)),
    "audio": FieldRule(REFUSED, "text only", (CHAT,)),
    "modalities": FieldRule(REFUSED, "text only", (CHAT,), ["text"]),
    "moderation": FieldRule(REFUSED, "no moderation runs here", (CHAT,)),
    "reasoning_effort": FieldRule(REFUSED, "these models do not reason", (CHAT,), "none"),
    "verbosity": FieldRule(REFUSED, "these models have no verbosity setting", (CHAT,), "medium"),
    "web_search_options": FieldRule(REFUSED, "no web search here", (CHAT,)),
    "encoding_format": FieldRule(HONOURED, '"float" or "base64" (little-endian float32)', (EMBEDDINGS,)),
    "dimensions": FieldRule(
        HONOURED,
        "only the model's own size, else a 400 (these embeddings are not trained to be shortened)",
        (EMBEDDINGS,),
    ),
    # extras: what other servers and transformers call them
    "top_k": FieldRule(HONOURED, _SAME_NAME),
    "repetition_penalty": FieldRule(HONOURED, _SAME_NAME),
    "no_repeat_ngram_size": FieldRule(HONOURED, _SAME_NAME),
    "num_beams": FieldRule(HONOURED, "extra: beam search, transformers' rules; n beams come back"),
    "length_penalty": FieldRule(HONOURED, _SAME_NAME + ", with num_beams"),
    "early_stopping": FieldRule(HONOURED, _SAME_NAME + ", with num_beams"),
    "json_schema": FieldRule(HONOURED, "extra (llama-server's): the output is JSON under this schema"),
    "grammar": FieldRule(HONOURED, "extra (llama-server's): GBNF, or Lark"),
    "regex": FieldRule(HONOURED, "extra: the output matches this regular expression"),
    "choice": FieldRule(HONOURED, "extra: the output is one of these strings"),
    "structured_outputs": FieldRule(HONOURED, "extra (vLLM's): choice, regex, json, grammar or json_object"),
    "guided_json": FieldRule(HONOURED, "extra (vLLM's older name): as json_schema"),
    "guided_regex": FieldRule(HONOURED, "extra (vLLM's older name): as regex"),
    "guided_choice": FieldRule(HONOURED, "extra (vLLM's older name): as choice"),
    "guided_grammar": FieldRule(HONOURED, "extra (vLLM's older name): as grammar"),
}
_noted: set[str] = set()  # fields logged as ignored (once each)


def check_fields(body: dict[str, Any], endpoint: str) -> None:
    """Refuse a REFUSED field that holds more than its neutral value (400 naming it); log, once
    per name, a field the endpoint does not read."""
    for name, value in body.items():
        rule = FIELDS.get(name)
        if rule is None or endpoint not in rule.endpoints:
            note = name if rule is None else f"{endpoint} {name}"
            if note not in _noted:
                _noted.add(note)
                where = "no version of OpenAI's API has it" if rule is None else f"{endpoint} does not read it"
                log.warning("request field %r ignored: %s (logged once)", _printable(name), where)
            continue
        if rule.status == REFUSED and value is not None and not _same(value, rule.neutral):
            only = "" if rule.neutral is None else f"; only {json.dumps(rule.neutral)} is accepted"
            raise ApiError(
                400,
                f"'{name}' is not supported by this server: {rule.why}{only}",
                param=name,
                code="unsupported_value",
            )


def _same(value: Any, neutral: Any) -> bool:
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _printable(text: str) -> str:
    return ascii(text[:100])[1:-1]


def fields_table() -> str:
    """FIELDS as the Markdown table docs/server.md shows."""
    names = {COMPLETIONS: "completions", CHAT: "chat", EMBEDDINGS: "embeddings"}
    lines = ["| field | endpoints | status | why |", "|---|---|---|---|"]
    for name, rule in FIELDS.items():
        status = rule.status if rule.neutral is None else f"{rule.status} (but {json.dumps(rule.neutral)})"
        where = ", ".join(names[e] for e in rule.endpoints)
        lines.append(f"| `{name}` | {where} | {status} | {rule.why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# -- requests ---------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    prompts: list[str | list[int]]  # several: each one's choices decoded together with the others'
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # the reply carries them
    chat: bool = False  # the prompt comes from `messages`
    tools: Tools | None = None  # the reply is a tool call (forced by the constraint)
    params: dict[str, str] = field(default_factory=dict)  # GenerationOptions field -> the request's field
    echo: bool = False  # completions: the prompt comes back before the output

    @property
    def choices(self) -> int:
        """Choices of the reply: n per prompt."""
        return len(self.prompts) * self.options.num_return_sequences

    def param_of(self, message: str) -> str | None:
        """The request field an error is about: GenerationOptions' and the model's refusals
        start with the option's name ("json_schema: ...", "logit_bias must ...")."""
        return self.params.get(message.split(" ", 1)[0].rstrip(":"))


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


def _stop(body: dict[str, Any], limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        stop = [stop] if stop else []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")
    if len(stop) > limits.max_stop:
        raise ApiError(
            400, f"'stop' holds {len(stop)} strings; at most {limits.max_stop} {limits.over('max_stop')}", param="stop"
        )
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_length:
        raise ApiError(
            400,
            f"a 'stop' string has {longest} characters; at most {limits.max_stop_length} "
            + limits.over("max_stop_length"),
            param="stop",
        )
    return stop


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def prompts_of(value: Any, name: str) -> list[str | list[int]]:
    """A completion's `prompt` or an embeddings `input`: a string, token ids, or an array of
    either, as a list of prompts."""
    if value is None:
        raise ApiError(400, f"'{name}' is required", param=name)
    if isinstance(value, str):
        return [value]
    if _is_ids(value):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_ids(p) for p in value):
            return [list(p) for p in value]
    raise ApiError(400, f"'{name}' must be a string, an array of token ids, or a non-empty array of either", param=name)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or text parts; null for assistant turns that made tool calls."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", param="messages")


def chat_prompt(messages: Any, tools: Tools | None = None) -> str:
    """The prompt for a conversation (the template is in the module docstring); `tools`, a
    forced tool call, adds its instructions to the system text."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    system, turns = [], []
    called: dict[str, str] = {}  # tool call id -> the function's name (for the tool's answer)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role, text = message.get("role"), _content(message.get("content"), i)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            turns.append(("User", text))
        elif role == "assistant":
            calls = _calls_made(message.get("tool_calls"), i, called)
            turns.append(("Assistant", "\n".join(filter(None, [text, *calls]))))
        elif role in ("tool", "function"):  # a tool's result ("function": OpenAI's older name)
            ref = message.get("tool_call_id")
            name = message.get("name") or called.get(ref) or ref
            turns.append((f"Tool ({name})" if isinstance(name, str) and name else "Tool", text))
        else:
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant or tool", param="messages")
    if not turns:
        raise ApiError(400, "'messages' holds no user message", param="messages")
    if tools is not None:
        system.append(tools.instructions())
    preamble = "\n\n".join(filter(None, system))
    if len(turns) == 1 and turns[0][0] == "User":
        body = turns[0][1]
    else:
        body = "\n".join(f"{label}: {text}" for label, text in turns) + "\nAssistant:"
    return f"{preamble}\n\n{body}" if preamble else body


def _calls_made(calls: Any, i: int, called: dict[str, str]) -> list[str]:
    """An assistant message's tool calls as transcript lines ("call NAME(ARGUMENTS)"), each
    call's id remembered with its name."""
    if calls is None:
        return []
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be an array", param="messages")
    lines = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, (str, dict)):
            raise ApiError(
                400, f'{where}: each call must be {{"function": {{"name": ..., "arguments": ...}}}}', param="messages"
            )
        if isinstance(call.get("id"), str):
            called[call["id"]] = name
        lines.append(f"call {name}({arguments if isinstance(arguments, str) else json.dumps(arguments)})")
    return lines


def _logprobs(body: dict[str, Any], chat: bool, limit: int) -> int | None:
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
    if not 0 <= top <= limit:
        over = f" (this server's limit, --max-logprobs {limit})" if limit < MAX_TOP_LOGPROBS else ""
        raise ApiError(400, f"'{name}' must be between 0 and {limit}, got {top}{over}", param=name)
    return top


def _max_tokens(body: dict[str, Any], name: str, chat: bool, limits: Limits) -> int:
    value = _field(body, name, int, limits.max_tokens if chat else 16)
    if chat and body.get("max_completion_tokens") is not None:
        name, value = "max_completion_tokens", _field(body, "max_completion_tokens", int)
    least = 0 if not chat and body.get("echo") is True else 1  # echo alone: the prompt's scores
    if not least <= value <= limits.max_tokens:
        raise ApiError(
            400,
            f"'{name}' must be between {least} and {limits.max_tokens}, got {value} {limits.over('max_tokens')}",
            param=name,
        )
    return value


def _temperature(body: dict[str, Any], name: str, chat: bool, limits: Limits) -> float:
    beams = (_field(body, "num_beams", int) or 1) > 1
    return _field(body, name, float, 0.0 if beams else 1.0)


def _seed(body: dict[str, Any], name: str, chat: bool, limits: Limits) -> int | None:
    seed = _field(body, name, int)
    if seed is not None and seed < 0:
        raise ApiError(400, f"'{name}' must be >= 0", param=name)
    return seed


def _early_stopping(body: dict[str, Any], name: str, chat: bool, limits: Limits) -> bool | str | None:
    early = body.get(name)
    if early is not None and early not in (True, False, "never"):
        raise ApiError(400, f"'{name}' must be true, false or \"never\"", param=name)
    return early


def _n(body: dict[str, Any], name: str, chat: bool, limits: Limits) -> int:
    n = _field(body, name, int, 1)
    if not 1 <= n <= limits.max_n:
        raise ApiError(
            400, f"'{name}' must be between 1 and {limits.max_n}, got {n} {limits.over('max_n')}", param=name
        )
    return n


def _logit_bias(body: dict[str, Any], name: str, chat: bool, limits: Limits) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{name}' must be an object of token ids to numbers from -100 to 100", param=name)
    return value  # GenerationOptions checks the ids and biases, the model its vocabulary


# -- structured output and tool calls --------------------------------------------------------
AUTO_REFUSED = (
    'tool_choice "auto" is not supported: this model was not trained to decide when to call a tool; '
    'send tool_choice "required" or {"type": "function", "function": {"name": ...}} to have it call one, '
    'or "none"'
)
# A constraint's spellings besides response_format and structured_outputs: field -> GenerationOptions field
TOP_LEVEL = {
    "json_schema": "json_schema",  # llama-server's
    "grammar": "grammar",  # llama-server's (GBNF), or Lark
    "regex": "regex",
    "choice": "choice",
    "guided_json": "json_schema",  # vLLM's older fields
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}  # vLLM's
ANY_OBJECT = {"type": "object"}  # OpenAI's json_object


@dataclass(frozen=True)
class Tools:
    """A chat request's forced tool call: the functions offered (name -> description and
    parameter schema) and the one tool_choice named, if it named one. The output is held to
    `schema()` and read back by `call()`."""

    functions: dict[str, dict[str, Any]]
    named: str | None = None

    def schema(self) -> dict[str, Any]:
        """The named function's parameters; else a call to any function as JSON
        `{"name": NAME, "arguments": ARGUMENTS}`."""
        if self.named is not None:
            return self.functions[self.named]["parameters"]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, f in self.functions.items()
        ]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def instructions(self) -> str:
        """What the prompt says of the call (the module docstring's template)."""
        lines = [
            f"- {name}: {f['description'] or name}; arguments: {json.dumps(f['parameters'])}"
            for name, f in self.functions.items()
            if self.named in (None, name)
        ]
        if self.named is not None:
            return f"Call this tool; answer with its arguments as JSON:\n{lines[0]}"
        head = 'Call one of these tools; answer with JSON {"name": the tool, "arguments": its arguments}:'
        return "\n".join([head, *lines])

    def call(self, text: str) -> dict[str, Any] | None:
        """OpenAI's tool call for an output, or None when the output is not a whole call."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            name, arguments = self.named, value
        elif isinstance(value, dict) and isinstance(value.get("name"), str) and "arguments" in value:
            name, arguments = value["name"], value["arguments"]
            if name not in self.functions:
                return None
        else:
            return None
        return {
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }


def _tools(body: dict[str, Any], chat: bool) -> Tools | None:
    """The tool call a request forces, if any (`tools` and `tool_choice`)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice in (None, "none", "auto"):  # nothing to call
            return None
        raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
    if not chat:
        raise ApiError(400, "'tools' are for /v1/chat/completions", param="tools")
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ApiError(
                400,
                f'tools[{i}]: only function tools are supported ({{"type": "function", "function": ...}})',
                param="tools",
            )
        name, parameters = function.get("name"), function.get("parameters")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"tools[{i}].function.name must be a non-empty string", param="tools")
        if parameters is None:  # OpenAI's meaning: no arguments
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema (an object)", param="tools")
        if name in functions:
            raise ApiError(400, f"tools[{i}]: a second function named {name!r}", param="tools")
        description = function.get("description")
        functions[name] = {"description": description if isinstance(description, str) else "", "parameters": parameters}
    if choice is None or choice == "auto":
        raise ApiError(400, AUTO_REFUSED, param="tool_choice", code="unsupported_value")
    if choice == "none":
        return None
    if choice == "required":
        return Tools(functions)
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        raise ApiError(
            400,
            '\'tool_choice\' must be "none", "required" or {"type": "function", "function": {"name": ...}} '
            '("auto" is not supported)',
            param="tool_choice",
        )
    if name not in functions:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among 'tools'", param="tool_choice")
    return Tools(functions, name)


def _constraint_value(value: Any, option: str, where: str, param: str) -> Any:
    """One constraint's value, checked for its JSON type (GenerationOptions checks the rest)."""
    if option == "json_schema":
        ok = isinstance(value, (dict, str))
        kind = "a JSON schema (an object)"
    elif option == "choice":
        ok = isinstance(value, list) and bool(value) and all(isinstance(c, str) and c for c in value)
        kind = "a non-empty array of non-empty strings"
    else:
        ok = isinstance(value, str) and bool(value)
        kind = "a non-empty string"
    if not ok:
        raise ApiError(400, f"'{where}' must be {kind}", param=param)
    return tuple(value) if option == "choice" else value


def _response_format(value: Any) -> tuple[str, Any] | None:
    """OpenAI's response_format (also llama-server's json_object with a "schema") as a
    (GenerationOptions field, value), or None for text."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        return "json_schema", ANY_OBJECT if schema is None else schema
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or spec.get("schema") is None:
            raise ApiError(400, "'response_format.json_schema.schema' is required", param="response_format")
        return "json_schema", spec["schema"]
    raise ApiError(
        400,
        '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}',
        param="response_format",
    )


@dataclass(frozen=True)
class OutputConstraint:
    """The one constraint a request asks for, however it spelled it."""

    option: str | None = None  # the GenerationOptions field (json_schema, regex, choice, grammar)
    value: Any = None
    param: str | None = None  # the request's field that asked
    tools: Tools | None = None  # a forced tool call (its schema is the constraint)


def read_constraint(body: dict[str, Any], chat: bool) -> OutputConstraint:
    """The constraint of a request, from OpenAI's response_format and tools, vLLM's
    structured_outputs and guided_* fields, or llama-server's and PocketLM's top-level fields;
    two of them are one 400 naming both."""
    found: list[tuple[str, str, Any, str]] = []  # (where, option, value, param)
    response_format = body.get("response_format")
    if response_format is not None:
        read = _response_format(response_format)
        if read is not None:
            found.append(("response_format", *read, "response_format"))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise ApiError(400, "'structured_outputs' must be an object", param="structured_outputs")
        if outputs.get("structural_tag") is not None:
            raise ApiError(
                400,
                "'structured_outputs.structural_tag' is not supported",
                param="structured_outputs",
                code="unsupported_value",
            )
        if outputs.get("json_object"):
            found.append(("structured_outputs.json_object", "json_schema", ANY_OBJECT, "structured_outputs"))
        for key, option in STRUCTURED_OUTPUTS.items():
            if outputs.get(key) is not None:
                found.append((f"structured_outputs.{key}", option, outputs[key], "structured_outputs"))
        if not found or found[-1][3] != "structured_outputs":
            raise ApiError(
                400, "'structured_outputs' must hold one of choice, regex, json, grammar", param="structured_outputs"
            )
    for name, option in TOP_LEVEL.items():
        if body.get(name) is not None:
            found.append((name, option, body[name], name))
    tools = _tools(body, chat)
    if tools is not None:
        found.append(("tools", "json_schema", tools.schema(), "tools"))
    if len(found) > 1:
        names = " and ".join(f"'{where}'" for where, *_ in found)
        raise ApiError(400, f"{names}: at most one constraint per request", param=found[1][3])
    if not found:
        return OutputConstraint()
    where, option, value, param = found[0]
    return OutputConstraint(option, _constraint_value(value, option, where, param), param, tools)


# GenerationOptions fields whose OpenAI reading is more than their JSON type: (body, the field's
# name in a request, chat, limits) -> value. OpenAI's defaults, the server's limits, aliases.
READERS: dict[str, Callable[[dict[str, Any], str, bool, Limits], Any]] = {
    "max_new_tokens": _max_tokens,
    "temperature": _temperature,
    "stop": lambda body, name, chat, limits: tuple(_stop(body, limits)),
    "seed": _seed,
    "early_stopping": _early_stopping,
    "num_return_sequences": _n,
    "logprobs": lambda body, name, chat, limits: _logprobs(body, chat, limits.max_logprobs),
    "logit_bias": _logit_bias,
}


@dataclass(frozen=True)
class RequestField:
    """A GenerationOptions field a request may set, from the field's metadata."""

    name: str  # in the request
    option: str  # the GenerationOptions field
    kind: Any  # its JSON type
    default: Any  # when the request leaves it out (OpenAI's meaning), unless model_default
    model_default: bool  # left out: the model's generation defaults apply


def _request_fields() -> list[RequestField]:
    hints = typing.get_type_hints(GenerationOptions)
    found = []
    for f in fields(GenerationOptions):
        name = f.metadata.get("request", f.name)
        if name is not None:
            kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            found.append(RequestField(name, f.name, kind, f.default, f.metadata.get("model_default", False)))
    return found


REQUEST_FIELDS = _request_fields()


def parse_request(
    body: dict[str, Any], chat: bool, limits: Limits | int = Limits(), model: Model | None = None
) -> GenerationRequest:
    """Check a completion or chat request: its prompt and GenerationOptions (on `model`'s
    generation defaults, when given, for what the request leaves out), within `limits` (an
    int: the max_tokens limit alone)."""
    if isinstance(limits, int):
        limits = Limits(max_tokens=limits)
    check_fields(body, CHAT if chat else COMPLETIONS)
    _field(body, "model", str)
    echo = not chat and _field(body, "echo", bool, False)
    if echo and model is not None and isinstance(model.engine, Seq2Seq):
        raise ApiError(400, ECHO_REFUSED, param="echo", code="unsupported_value")
    constraint = read_constraint(body, chat)
    prompts = (
        [chat_prompt(body.get("messages"), constraint.tools)] if chat else prompts_of(body.get("prompt"), "prompt")
    )
    given: dict[str, Any] = {}
    for f in REQUEST_FIELDS:
        read = READERS.get(f.option)
        if f.option in CONSTRAINTS:  # read together, from any of their spellings
            value = constraint.value if f.option == constraint.option else f.default
        elif read is not None:
            value = read(body, f.name, chat, limits)
        else:
            value = _field(body, f.name, f.kind, None if f.model_default else f.default)
        if value is not None or not f.model_default:
            given[f.option] = value
    params = {f.option: f.name for f in REQUEST_FIELDS if f.name in body}
    if constraint.option is not None:
        params[constraint.option] = constraint.param  # type: ignore[assignment]
    try:
        options = model.options(**given) if model is not None else GenerationOptions(**given)
    except PocketLMError as e:
        raise ApiError(400, str(e), param=params.get(str(e).split(" ", 1)[0].rstrip(":"))) from None
    if options.num_beams > limits.max_beams:  # asked, or the model's default
        raise ApiError(
            400,
            f"'num_beams' is {options.num_beams}; at most {limits.max_beams} {limits.over('max_beams')}",
            param="num_beams",
        )
    stream_options = _field(body, "stream_options", dict, {})
    return GenerationRequest(
        prompts,
        options,
        stream=_field(body, "stream", bool, False),
        include_usage=bool(_field(stream_options, "include_usage", bool, False)),
        logprobs=options.logprobs is not None,
        chat=chat,
        tools=constraint.tools,
        params=params,
        echo=echo,
    )


# -- responses --------------------------------------------------------------------------
@dataclass
class Echo:
    """A prompt as a completion's `echo` returns it: its text and token ids and, when
    log-probabilities were asked, those of its tokens after the first (which has none)."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob] | None = None


class Reply:
    """The JSON objects of one response: completion or chat, whole or streamed, with one
    choice per returned sequence (`n` per prompt, prompt i's j-th at index i*n+j) and, when
    asked, OpenAI's log-probability objects (after the echoed prompt's, with `echo`)."""

    def __init__(
        self,
        chat: bool,
        model: str,
        token_bytes: Any = None,
        tools: Tools | None = None,
        n: int = 1,
        echoes: list[Echo] | None = None,
    ):
        self.chat, self.model, self.tools, self.n, self.echoes = chat, model, tools, n, echoes
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        # token id -> its bytes (for logprobs: each token's text, and its bytes in chat), cached
        self.token_bytes = functools.lru_cache(maxsize=4096)(token_bytes) if token_bytes is not None else None
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

    def echo(self, index: int) -> Echo | None:
        """The prompt choice `index` echoes, if any."""
        return self.echoes[index // self.n] if self.echoes is not None else None

    def logprobs(self, index: int, items: list[TokenLogprob] | None, echo: Echo | None = None) -> dict[str, Any] | None:
        """OpenAI's logprobs object for some tokens of one choice (None when not asked), after
        those of an echoed prompt."""
        if items is None:
            return None
        shown = [lp.render(self.token_bytes) for lp in items]  # each token with its text
        if echo is not None and echo.logprobs is not None:
            first = echo.ids[0]
            head = {"token_id": first, "token": self.token_bytes(first).decode("utf-8", "replace"), "logprob": None}
            shown = [{**head, "top": None}, *(lp.render(self.token_bytes) for lp in echo.logprobs), *shown]
        if self.chat:
            content = [
                {
                    **self._token(s),
                    "logprob": s["logprob"],
                    "top_logprobs": [{**self._token(a), "logprob": a["logprob"]} for a in s["top"]],
                }
                for s in shown
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for s in shown:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(s["token"])
        return {
            "tokens": [s["token"] for s in shown],
            "token_logprobs": [s["logprob"] for s in shown],
            "top_logprobs": [None if s["top"] is None else _by_text(s["top"]) for s in shown],
            "text_offset": offsets,
        }

    def _token(self, shown: dict[str, Any]) -> dict[str, Any]:
        return {"token": shown["token"], "bytes": list(self.token_bytes(shown["token_id"]))}

    def whole(
        self, texts: list[str], logprobs: list[list[TokenLogprob] | None], results: list[GenerationResult]
    ) -> dict[str, Any]:
        """The response to a whole request: each choice's text and log-probabilities, and each
        prompt's result (its `sequences`, in order)."""
        choices = []
        sequences = [r for result in results for r in result.sequences]
        for i, (text, lps, r) in enumerate(zip(texts, logprobs, sequences)):
            finish = r.finish_reason
            if self.chat:
                call = self._call(text, finish)
                message = {"role": "assistant", "content": text} if call is None else self._message(call)
                body, finish = {"message": message}, finish if call is None else "tool_calls"
                choices.append(self._choice(i, body, self.logprobs(i, lps), finish))
            else:
                echo = self.echo(i)
                body = {"text": text if echo is None else echo.text + text}
                choices.append(self._choice(i, body, self.logprobs(i, lps, echo), finish))
        return self._wrap("chat.completion" if self.chat else "text_completion", choices, usage=usage(results))

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

    def echo_chunk(self, index: int, logprobs: bool) -> dict[str, Any] | None:
        """A streamed completion choice's first chunk with `echo`: its prompt (and the prompt's
        log-probabilities when asked)."""
        echo = self.echo(index)
        if echo is None:
            return None
        lp = self.logprobs(index, [], echo) if logprobs else None
        return self._wrap("text_completion", [self._choice(index, {"text": echo.text}, lp, None)])

    def closing(self, index: int, text: str, finish: str) -> list[dict[str, Any]]:
        """The last chunks of a streamed choice: its finish reason, after, when a tool call was
        forced (its text was held back), the call as one delta, or the text when the output is
        not a whole call."""
        if self.tools is None:
            return [self.chunk(finish=finish, index=index)]
        call = self._call(text, finish)
        if call is None:
            return [*([self.chunk(text, index=index)] if text else []), self.chunk(finish=finish, index=index)]
        delta = {"tool_calls": [{"index": 0, **call}]}
        return [
            self._wrap("chat.completion.chunk", [self._choice(index, {"delta": delta}, None, None)]),
            self.chunk(finish="tool_calls", index=index),
        ]

    def _call(self, text: str, finish: str) -> dict[str, Any] | None:
        """The tool call an output makes: a forced call that ended complete."""
        return self.tools.call(text) if self.tools is not None and finish == "stop" else None

    @staticmethod
    def _message(call: dict[str, Any]) -> dict[str, Any]:
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def usage_chunk(self, results: list[GenerationResult]) -> dict[str, Any]:
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(results))


def _by_text(top: list[dict[str, Any]]) -> dict[str, float]:
    """Completions' alternatives, keyed by their text: of two with one text (bytes that are not
    UTF-8 alone both show as U+FFFD), the likelier, so the greatest value is always there."""
    found: dict[str, float] = {}
    for a in top:
        found.setdefault(a["token"], a["logprob"])
    return found


def usage(results: list[GenerationResult]) -> dict[str, int]:
    """OpenAI's usage of a request: every prompt's tokens, every choice's new tokens."""
    prompt = sum(r.prompt_tokens for r in results)
    n = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


# -- embeddings, tokens ---------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingsRequest:
    inputs: list[str | list[int]]
    base64: bool = False  # encoding_format "base64": little-endian float32, as OpenAI's
    dimensions: int | None = None  # when given, it must be the model's size


def parse_embeddings(body: dict[str, Any], limits: Limits = Limits()) -> EmbeddingsRequest:
    """Check an embeddings request (OpenAI's shape)."""
    check_fields(body, EMBEDDINGS)
    _field(body, "model", str)
    dimensions = _field(body, "dimensions", int)
    inputs = prompts_of(body.get("input"), "input")
    if len(inputs) > limits.max_inputs:
        raise ApiError(
            400,
            f"'input' holds {len(inputs)} inputs; at most {limits.max_inputs} {limits.over('max_inputs')}",
            param="input",
        )
    encoding = _field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, '\'encoding_format\' must be "float" or "base64"', param="encoding_format")
    return EmbeddingsRequest(inputs, encoding == "base64", dimensions)


def embeddings_reply(model: str, vectors: np.ndarray, tokens: int, as_base64: bool) -> dict[str, Any]:
    """OpenAI's embeddings response: one object per input, in order."""
    data = []
    for i, vector in enumerate(vectors):
        if as_base64:
            value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        else:
            value = np.asarray(vector, dtype=np.float32).tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@dataclass(frozen=True)
class TokenizeRequest:
    text: str
    add_special: bool  # the special tokens the model's tokenizer adds (T5's closing </s>)
    with_pieces: bool  # each token as {"id", "piece"}


def _one_of(body: dict[str, Any], names: tuple[str, str], kind: type, default: Any) -> Any:
    """A field two servers spell differently (llama-server's name first); both, differing, are a 400."""
    values = [_field(body, name, kind) for name in names]
    given = [v for v in values if v is not None]
    if len(given) == 2 and given[0] != given[1]:
        raise ApiError(400, f"'{names[0]}' and '{names[1]}' differ: send one", param=names[1])
    return given[0] if given else default


def parse_tokenize(body: dict[str, Any]) -> TokenizeRequest:
    """llama-server's /tokenize request (`content`, `add_special`, `with_pieces`, `parse_special`),
    or vLLM's and lm-eval's (`prompt`, `add_special_tokens`). add_special defaults to false,
    as llama-server's; special tokens written in the text are always read as such."""
    text = _one_of(body, ("content", "prompt"), str, None)
    if text is None:
        raise ApiError(400, "'content' (or 'prompt') is required", param="content")
    if _field(body, "parse_special", bool, True) is False:
        raise ApiError(
            400,
            "'parse_special' false is not supported: special tokens in the text are read as such",
            param="parse_special",
            code="unsupported_value",
        )
    add_special = _one_of(body, ("add_special", "add_special_tokens"), bool, False)
    return TokenizeRequest(text, add_special, _field(body, "with_pieces", bool, False))


def parse_detokenize(body: dict[str, Any], vocab_size: int) -> list[int]:
    """The token ids of a /detokenize request (`tokens`), each in the vocabulary."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, "'tokens' must be an array of token ids", param="tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param="tokens")
    return tokens


def piece(data: bytes) -> str | list[int]:
    """A token's piece as llama-server shows it: text when valid UTF-8, else its bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)

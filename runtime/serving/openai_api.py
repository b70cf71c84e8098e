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
model's own, before penalties and temperature. Fields PocketLM cannot honour (`best_of`,
`echo`, `logit_bias`, ...) are refused unless they hold their neutral value. Unknown fields
are ignored. What one request may ask (tokens, stop strings, choices, beams, alternatives,
prompt length) is bounded by `Limits`; a request over one gets a 400 naming the limit.

The options a request may set are GenerationOptions' fields, named as their metadata says
(`REQUEST_FIELDS`: `max_tokens`, `n`, the others by their own names); each is read as its JSON
type, or by one of `READERS` where OpenAI's meaning needs more (defaults, limits, aliases).
Transformers' search options a request leaves out take the model's generation defaults; the
others, PocketLM's (OpenAI's) defaults.

Chat prompts: these are instruction models without a chat template. A lone user message
(after optional system messages) is sent as `system + "\\n\\n" + user`, or the bare user text;
longer conversations become a transcript `"{system}\\n\\nUser: ...\\nAssistant: ...\\nUser:
...\\nAssistant:"`.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pocketlm.converters.core.errors import PocketLMError
from pocketlm.core.generation import (
    MAX_SEQUENCES,
    MAX_TOP_LOGPROBS,
    GenerationOptions,
    GenerationResult,
    TokenLogprob,
)
from pocketlm.core.model import Model

# OpenAI fields PocketLM cannot honour: accepted only with their neutral value.
NEUTRAL: dict[str, Any] = {
    "best_of": 1,
    "echo": False,
    "suffix": "",
    "logit_bias": {},
    "tools": [],
}
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


# -- requests ---------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    prompt: str | list[int]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # the reply carries them
    chat: bool = False  # the prompt comes from `messages`


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
    if not 1 <= value <= limits.max_tokens:
        raise ApiError(
            400,
            f"'{name}' must be between 1 and {limits.max_tokens}, got {value} {limits.over('max_tokens')}",
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
REQUEST_NAMES = {f.option: f.name for f in REQUEST_FIELDS}  # GenerationOptions field -> its request name


def parse_request(
    body: dict[str, Any], chat: bool, limits: Limits | int = Limits(), model: Model | None = None
) -> GenerationRequest:
    """Check a completion or chat request: its prompt and GenerationOptions (on `model`'s
    generation defaults, when given, for what the request leaves out), within `limits` (an
    int: the max_tokens limit alone)."""
    if isinstance(limits, int):
        limits = Limits(max_tokens=limits)
    _check_neutral(body)
    _field(body, "model", str)
    prompt = chat_prompt(body.get("messages")) if chat else _completion_prompt(body)
    given: dict[str, Any] = {}
    for f in REQUEST_FIELDS:
        read = READERS.get(f.option)
        if read is not None:
            value = read(body, f.name, chat, limits)
        else:
            value = _field(body, f.name, f.kind, None if f.model_default else f.default)
        if value is not None or not f.model_default:
            given[f.option] = value
    try:
        options = model.options(**given) if model is not None else GenerationOptions(**given)
    except PocketLMError as e:
        param = REQUEST_NAMES.get(str(e).split(" ", 1)[0])  # GenerationOptions' messages start with the field
        raise ApiError(400, str(e), param=param if param in body else None) from None
    if options.num_beams > limits.max_beams:  # asked, or the model's default
        raise ApiError(
            400,
            f"'num_beams' is {options.num_beams}; at most {limits.max_beams} {limits.over('max_beams')}",
            param="num_beams",
        )
    stream_options = _field(body, "stream_options", dict, {})
    return GenerationRequest(
        prompt,
        options,
        stream=_field(body, "stream", bool, False),
        include_usage=bool(_field(stream_options, "include_usage", bool, False)),
        logprobs=options.logprobs is not None,
        chat=chat,
    )


# -- responses --------------------------------------------------------------------------
class Reply:
    """The JSON objects of one response: completion or chat, whole or streamed, with one
    choice per returned sequence and, when asked, OpenAI's log-probability objects."""

    def __init__(self, chat: bool, model: str, token_bytes: Any = None):
        self.chat, self.model = chat, model
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

    def logprobs(self, index: int, items: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's logprobs object for some tokens of one choice (None when not asked)."""
        if items is None:
            return None
        shown = [lp.render(self.token_bytes) for lp in items]  # each token with its text
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
            "top_logprobs": [{a["token"]: a["logprob"] for a in s["top"]} for s in shown],
            "text_offset": offsets,
        }

    def _token(self, shown: dict[str, Any]) -> dict[str, Any]:
        return {"token": shown["token"], "bytes": list(self.token_bytes(shown["token_id"]))}

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

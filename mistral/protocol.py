"""The request protocol: every field of a chat or text completion request, declared once.

    req = ChatCompletionRequest.parse({"messages": [...], "temperature": 0.7})  # RequestError names a bad field
    gen = req.generation_params(prompt_len=12, prompt_param="messages", max_seq_len=8192, vocab_size=32768)

A field is a dataclass field: its annotation is the JSON type it takes (what the HTTP schema, which
server.py builds from these classes, declares and /docs shows), its default what absence or null
means, and its metadata a one-line doc and the check of its value. The Python API
(`Mistral.create_chat_completion`, ...) parses its keyword arguments here, and so, through it, does
the HTTP layer. A check here needs only the value; what needs the model (token ids, the context's
room) is checked in `generation_params`, and the messages, tools and response_format by prompt.py
and structured.py, which read them.

Adding a sampling parameter: a field here (read in `generation_params`), and its use in the engine.
No pydantic here: generate.py imports this module, and runs where the server's packages are not installed.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from .engine import GenerationParams
from .errors import RequestError
from .tokenizer import check_stop_strings

MAX_N = 16
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20

Check = Callable[[str, Any], Any]  # (the field's name as the error names it, the value given) -> the value kept


def field(default: Any, doc: str, check: Check | None = None, *, required: bool = False,
          http: Any = True) -> Any:
    """A request field. required: the HTTP schema needs it (the Python API takes it as an argument).
    http: False keeps the field out of the HTTP schema; a type declares it with that JSON type there."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "required": required, "http": http})


# --- checks ------------------------------------------------------------------------------------------


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise RequestError(f"{name} must be a number, got {value!r}", param=name)
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


def _integer(name: str, value, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be {bounds}, got {value}", param=name)
    return value


def number(low: float, high: float, low_open: bool = False) -> Check:
    return lambda name, value: _number(name, value, low, high, low_open)


def integer(low: int, high: int | None = None) -> Check:
    return lambda name, value: _integer(name, value, low, high)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def stop_strings(name: str, value) -> tuple[str, ...]:
    if not isinstance(value, (str, list)):
        raise RequestError("stop must be a string or a list of strings", param=name)
    stops = check_stop_strings(value)
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param=name)
    return tuple(stops)


def obj(name: str, value) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be an object", param=name)
    return value


def nested(cls: type) -> Check:
    """An object whose fields are those of the protocol class `cls`."""
    return lambda name, value: cls.parse(obj(name, value), prefix=f"{name}.")


# --- the requests ------------------------------------------------------------------------------------


class _Fields:
    """Parsing a dict of fields into one of the dataclasses below."""

    @classmethod
    def parse(cls, values: dict, prefix: str = ""):
        """The request of `values` (keyword arguments or a JSON object), each field checked; a field
        this class doesn't declare is a RequestError naming it. None means the field's default."""
        fields = dataclasses.fields(cls)
        unknown = sorted(set(values) - {f.name for f in fields})
        if unknown:
            names = ", ".join(prefix + n for n in unknown)
            raise RequestError(f"unknown parameter{'s' if len(unknown) > 1 else ''}: {names}", param=prefix + unknown[0])
        kept = {}
        for f in fields:
            value = values.get(f.name)
            if value is not None:
                check = f.metadata["check"]
                kept[f.name] = check(prefix + f.name, value) if check else value
        return cls(**kept)

    @classmethod
    def http_fields(cls) -> list[tuple[str, Any, bool, str]]:
        """(name, JSON type, required, doc) of each field the HTTP schema declares."""
        out = []
        for f in dataclasses.fields(cls):
            http = f.metadata["http"]
            if http is not False:
                out.append((f.name, f.type if http is True else http, f.metadata["required"], f.metadata["doc"]))
        return out


@dataclass(frozen=True)
class StreamOptions(_Fields):
    """Options of a streamed answer."""

    include_usage: bool = field(False, "end the stream with a chunk holding the usage", boolean)


@dataclass(frozen=True)
class GenerationRequest(_Fields):
    """The fields both endpoints share: OpenAI's, then vLLM's extensions."""

    model: str | None = field(None, "the served model's name (another one is a 404)", required=True)
    stream: bool = field(False, "answer with server-sent `chat.completion.chunk`s", boolean)
    stream_options: StreamOptions | None = field(None, "options of a streamed answer", nested(StreamOptions))
    max_tokens: int | None = field(None, "the most tokens an answer may have (default: up to the context's end)",
                                   integer(1))
    temperature: float = field(1.0, "0 is greedy; up to 2", number(0.0, 2.0))
    top_p: float = field(1.0, "nucleus sampling: keep the tokens within this probability mass, (0, 1]",
                         number(0.0, 1.0, low_open=True))
    n: int = field(1, f"answers per prompt, up to {MAX_N}", integer(1, MAX_N))
    stop: str | list[str] | None = field((), f"up to {MAX_STOP_STRINGS} strings that end the answer (not included)",
                                         stop_strings)
    seed: int | None = field(None, "reproduce a sampled answer (choice i uses seed + i; default: a fresh one each time)",
                             integer(-(2**63), 2**63 - 1))
    presence_penalty: float = field(0.0, "minus this for each token already present, [-2, 2]", number(-2.0, 2.0))
    frequency_penalty: float = field(0.0, "minus this times each token's count so far, [-2, 2]", number(-2.0, 2.0))
    logit_bias: dict[str, float] | None = field(None, "token id -> a bias in [-100, 100] added to its logit")
    user: str | None = field(None, "the caller's name; unused")
    # vLLM's
    top_k: int = field(0, "keep the k most likely tokens; 0 or -1 keeps all")
    min_p: float = field(0.0, "drop tokens below min_p times the top token's probability, [0, 1]", number(0.0, 1.0))
    repetition_penalty: float = field(1.0, "divide repeated tokens' positive logits by this (multiply negative "
                                           "ones), (0, 10]", number(0.0, 10.0, low_open=True))
    ignore_eos: bool = field(False, "don't stop at EOS", boolean)
    min_tokens: int = field(0, "EOS is banned until this many tokens are out", integer(0))
    response_format: dict[str, Any] | None = field(None, '{"type": "text" | "json_object" | "json_schema", ...}')
    max_completion_tokens: int | None = field(None, "max_tokens' newer name", integer(1))
    logprobs: bool = field(False, "return each token's logprob", boolean)
    top_logprobs: int = field(0, f"and the most likely alternatives at each position, up to {MAX_TOP_LOGPROBS}",
                              integer(0, MAX_TOP_LOGPROBS))

    def __post_init__(self):
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def generation_params(self, *, prompt_len: int, prompt_param: str, max_seq_len: int,
                          vocab_size: int) -> GenerationParams:
        """The engine's parameters for a prompt of `prompt_len` tokens, held by the field
        `prompt_param` ("messages" or "prompt"): the checks that need the model."""
        limit = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        param = "max_tokens" if self.max_tokens is not None else "max_completion_tokens"
        # OpenAI's words, which client libraries match on (litellm's ContextWindowExceededError).
        words = "messages" if prompt_param == "messages" else "prompt"
        room = max_seq_len - prompt_len
        if room <= 0:
            raise RequestError(
                f"This model's maximum context length is {max_seq_len} tokens. However, your {words} resulted "
                f"in {prompt_len} tokens. Please reduce the length of the {words}.",
                param=prompt_param, code="context_length_exceeded")
        if limit is None:
            limit = room
        elif limit > room:
            raise RequestError(
                f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                f"{prompt_len + limit} tokens ({prompt_len} in the {words}, {limit} in the completion). Please "
                f"reduce the length of the {words} or completion.", param=param, code="context_length_exceeded")
        if self.min_tokens > limit:
            raise RequestError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({limit})", param="min_tokens")
        return GenerationParams(
            max_tokens=limit, temperature=self.temperature, top_k=_integer("top_k", 0 if self.top_k == -1 else self.top_k,
                                                                           0, vocab_size),
            top_p=self.top_p, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=_logit_bias(self.logit_bias, vocab_size), seed=self.seed, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
        )


@dataclass(frozen=True)
class ChatCompletionRequest(GenerationRequest):
    """A chat completion: `POST /v1/chat/completions`, `Mistral.create_chat_completion`."""

    messages: list[dict[str, Any]] | None = field(None, "the conversation (checked message by message in prompt.py)",
                                                  required=True)
    tools: list[dict[str, Any]] | None = field(None, "functions the model may call")
    tool_choice: str | dict[str, Any] | None = field(None, '"none", "auto", "required" or {"type": "function", ...}')
    parallel_tool_calls: bool = field(True, "allow more than one call in an answer", boolean)
    continue_final_message: bool = field(False, "vLLM's: continue the last (assistant) message's text", boolean)


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    """A text completion (no chat format): `POST /v1/completions`, `Mistral.create_completion`."""

    prompt: Any = field(None, "a string, a list of token ids, or a list of either (checked in generate.py)",
                        required=True)
    # The legacy endpoint's own: `logprobs` is an integer there (how many alternatives to list per
    # token; `from_http` maps it), and it has no max_completion_tokens.
    logprobs: bool = field(False, "return each token's logprob", boolean,
                           http=int | None)
    top_logprobs: int = field(0, "the most likely alternatives at each position", integer(0, MAX_TOP_LOGPROBS),
                              http=False)
    max_completion_tokens: int | None = field(None, "max_tokens' newer name", integer(1), http=False)

    @staticmethod
    def from_http(body: dict) -> dict:
        """The keyword arguments of `Mistral.create_completion` for a legacy completions body."""
        body = {"max_tokens": 16, **body}  # the legacy endpoint's default, as OpenAI and vLLM have it
        if body.get("logprobs") is not None:
            body["top_logprobs"], body["logprobs"] = body["logprobs"], True
        return body


def _logit_bias(logit_bias, vocab_size: int) -> dict[int, float] | None:
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise RequestError("logit_bias must map token ids to numbers", param="logit_bias")
    out = {}
    for key, value in logit_bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab_size or str(token) != str(key).strip():
            raise RequestError(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        out[token] = _number(f"logit_bias[{key!r}]", value, -100.0, 100.0)
    return out or None

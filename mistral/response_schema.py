"""The shapes of the server's answers, for its OpenAPI document (`/openapi.json`).

The generator builds its answers as plain dicts in OpenAI's shapes (generate.py); these pydantic
models only describe them, so that API tooling (client generators, schemathesis) can read what a
200 holds. The tests check real answers against the published schemas, so a drift between the two
fails there. Extra fields are allowed, as OpenAI adds fields over time and clients ignore unknown ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

FinishReason = Literal["stop", "length", "tool_calls"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Open):
    cached_tokens: int


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCall(_Open):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Open):
    content: list[TokenLogprob] | None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Open):
    """`POST /chat/completions` without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Open):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Open):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class _Generated(_Open):
    """The fields a streamed chat chunk and a text completion share (each adds `object` and `choices`)."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChatCompletionChunk(_Generated):
    """One server-sent event of `POST /chat/completions` with `stream: true`; the stream ends with
    `data: [DONE]`. With `stream_options.include_usage`, the last chunk has no choices and a usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChunkChoice]


class CompletionLogprobs(_Open):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int] | None


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Generated):
    """`POST /completions`; streamed, each server-sent event has this shape too (a piece of the text
    per choice), and the stream ends with `data: [DONE]`."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class Model(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[Model]


class TokenizeResponse(_Open):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Open):
    prompt: str


class Version(_Open):
    version: str


RESPONSES = (ChatCompletion, ChatCompletionChunk, Completion, Model, ModelList, TokenizeResponse, DetokenizeResponse,
             Version)

"""The OpenAI-compatible HTTP API: chat and text completions over the batching engine.

    app = create_app(lambda: Mistral.from_pretrained(path, fixed_batch_shape=True), api_key="sk-...")
    uvicorn.run(app, host="127.0.0.1", port=8000)       # or: mistral serve WEIGHTS

Routes, under both `/v1` and `/v3/openai` (the provider page's base URL path):

    POST /chat/completions     POST /completions     GET /models     GET /models/{name}
    GET  /debug/engine         (rows running, waiting and free: to watch batching and cancellation)
    POST /tokenize             POST /detokenize      (vLLM's shapes; at the root too, as vLLM has them)

and, without a key: `GET /health` (and `/v1/health`): 503 while the model loads, then 200; `GET /version`;
`GET /metrics` (Prometheus text, metrics.py); `GET /openapi.json` (the request schemas below, the error
body) and `GET /docs` (its interactive page). With `allowed_origins`, CORS headers for those origins.

This layer is thin, as vLLM's is: it checks the key, reads the JSON body against the schemas below,
hands the parameters to `Mistral.acreate_chat_completion` / `acreate_completion` (which validate
their values and return OpenAI-shaped dicts), and frames chunks as server-sent events. It knows
nothing of tensors. Every failure leaves as OpenAI's error body,

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with 400 for anything wrong in a request, 401 for the key, 404 for an unknown model or route, 405
(with `Allow`) for a wrong method, 408 for a body that stops arriving, 413 for an oversized body, 429
when the engine's queue is full and 503 while loading. A 500 means a fault of ours; its body never
carries a traceback (the log does), and it says `Connection: close`. Malformed HTTP never reaches
the app: uvicorn answers it with a plain-text 400.

A client that goes away is noticed by a task that waits for `http.disconnect`; the generation is
then cancelled, and the engine frees its cache row at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import types
import typing
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import protocol
from .errors import RequestError
from .metrics import Metrics
from .responses import dumps
from .response_schema import (RESPONSES, ChatCompletion, ChatCompletionChunk, Completion, DetokenizeResponse, Model,
                              ModelList, TokenizeResponse, Version)

if TYPE_CHECKING:
    from .generate import Mistral

log = logging.getLogger("mistral.server")

MAX_BODY_BYTES = 4 * 2**20  # a 32k-token conversation is ~150 KB of text; tool schemas add a little
# A client that stops sending half-way holds a connection (and a graceful shutdown) forever.
HEADER_TIMEOUT_S = 10.0  # from the connection (or the last answer on it) to the end of the request's headers
BODY_TIMEOUT_S = 30.0  # the longest pause between two pieces of a body
SHUTDOWN_TIMEOUT_S = 30.0  # on SIGTERM, how long running answers may take to finish before they are cut
OWNED_BY = "mistral-from-scratch"


# --- request schemas ---------------------------------------------------------------------------------
#
# The generation requests are protocol.py's, as pydantic models built from its fields, for types
# and names only: `strict=True` refuses "5" for an integer or 1 for a boolean, with OpenAI's
# words. Values (ranges, stop strings, logit_bias ids, the messages and tools themselves) are
# checked when protocol.py parses the fields for `Mistral`, which names the offending one.
#
# Fields these schemas don't declare are accepted and ignored, with one warning per request naming
# them, as vLLM does: clients add fields every release (`metadata`, `store`, `service_tier`,
# `stream_options.include_obfuscation`...), and a 400 for them breaks a client that would work.


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def ignored_fields(self) -> list[str]:
        """The fields given that no schema declares, nested ones as `stream_options.x`."""
        names = list(self.model_extra or ())
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, _Schema):
                names += [f"{name}.{n}" for n in value.ignored_fields()]
        return names

    def given(self) -> dict:
        """The declared fields given non-null: the keyword arguments of a `Mistral` call."""
        drop: dict[str, Any] = {name: True for name in self.model_extra or ()}
        for name in type(self).model_fields:
            if isinstance(value := getattr(self, name), _Schema) and value.model_extra:
                drop[name] = {n: True for n in value.model_extra}
        return self.model_dump(exclude_none=True, exclude=drop)


def _members(annotation: Any) -> list:
    """The types of a union, None left out (an optional field takes null)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for m in typing.get_args(annotation) if m is not type(None)]
    return [annotation]


@functools.cache
def _schema(request: type) -> type[_Schema]:
    """The pydantic model of a protocol.py request (or nested object): its HTTP fields, each with
    its JSON type and doc; a required one takes no null."""
    fields: dict[str, Any] = {}
    for name, annotation, required, doc in request.http_fields():
        members = tuple(_schema(m) if dataclasses.is_dataclass(m) else m for m in _members(annotation))
        annotation = typing.Union[members]
        fields[name] = (annotation, Field(..., description=doc)) if required else \
            (annotation | None, Field(None, description=doc))
    return create_model(request.__name__, __base__=_Schema, __doc__=request.__doc__, **fields)


ChatCompletionRequest = _schema(protocol.ChatCompletionRequest)
CompletionRequest = _schema(protocol.CompletionRequest)


class TokenizeRequest(_Schema):
    """vLLM's /tokenize: a text `prompt`, or chat `messages` (with `tools`) rendered as a chat prompt."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None  # checked in prompt.py
    tools: list[dict[str, Any]] | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None  # <s> before a text prompt (default true); a chat prompt always has it


class DetokenizeRequest(_Schema):
    model: str | None = None
    tokens: list[int]


# OpenAI parameters this server knows but does not implement: accepted and ignored like unknown
# ones, but named as such in the warning (and in README.md).
NOT_SUPPORTED = frozenset({
    "audio", "best_of", "echo", "function_call", "functions", "metadata", "modalities", "prediction",
    "prompt_cache_key", "reasoning_effort", "safety_identifier", "service_tier", "store", "suffix", "verbosity",
    "web_search_options", "stream_options.include_obfuscation",
})


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every answer that is not a 200."""

    error: ErrorDetail


def _warn_ignored(req: _Schema) -> None:
    names = req.ignored_fields()
    if names:
        known = [n for n in names if n in NOT_SUPPORTED]
        unknown = [n for n in names if n not in NOT_SUPPORTED]
        log.warning("ignoring request fields: %s", "; ".join(
            part for part in (known and f"not supported: {', '.join(known)}",
                              unknown and f"unknown: {', '.join(unknown)}") if part))


# --- errors --------------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 429: "requests",
                500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=_ERROR_TYPES.get(self.status, "invalid_request_error"),
                             param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self, headers: dict | None = None) -> JSONResponse:
        if self.status >= 500 or self.status == 408:  # a connection in an unknown state: say it ends here
            headers = {**(headers or {}), "Connection": "close"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _parse_body(body: bytes, schema: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                            "object (the Content-Type header should be application/json).",
                       code="invalid_json") from None
    if _MAYBE_SURROGATE.search(body):
        _check_unicode(data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e, schema, data) from None


def _from_request_error(e: RequestError) -> APIError:
    if e.code == "queue_full":
        return APIError(429, e.message, e.param, e.code)
    return APIError(400, e.message, e.param, e.code)


def _from_validation_error(e: ValidationError, schema: type[BaseModel], data: Any) -> APIError:
    err = e.errors(include_url=False)[0]
    if not err["loc"]:
        if isinstance(data, dict):  # the body as a whole is an object, but pydantic refused it
            return APIError(400, f"the request body is invalid: {err['msg']}")
        return APIError(400, f"the request body must be a JSON object, got {_json_type(data)}")
    param, expected, value = _locate(schema, data, err["loc"])
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    return APIError(400, f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)}.",
                    param, "invalid_type")


def _locate(schema: type[BaseModel], data: Any, loc: tuple) -> tuple[str, str, Any]:
    """Follow pydantic's error location through the schema and the body: the field's name as OpenAI
    writes it (`messages[2]`, `stream_options.include_usage`), the type it wants, the value it got.

    The walk stops at the first step that is neither a list index nor a field of a nested schema:
    pydantic puts union members' labels ("list[str]") and dict keys in the path too.
    """
    field = schema.model_fields.get(loc[0])
    param, value = str(loc[0]), data.get(loc[0]) if isinstance(data, dict) else None
    annotation = field.annotation if field is not None else None
    for part in loc[1:]:
        members = _members(annotation)
        items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if isinstance(part, int) and items and isinstance(value, list):
            param, annotation, value = f"{param}[{part}]", items[0], value[part]
        elif isinstance(part, str) and models and isinstance(value, dict):  # a field, or a key it doesn't know
            field = models[0].model_fields.get(part)
            param, annotation, value = f"{param}.{part}", field.annotation if field else None, value.get(part)
        else:
            break
    return param, _describe(annotation), value


def _describe(annotation: Any, plural: bool = False) -> str:
    """A type in the words of JSON: `str | list[str]` -> "a string or an array of strings"."""
    names = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             bool: ("a boolean", "booleans")}
    words = []
    for m in _members(annotation):
        if m in names:
            words.append(names[m][plural])
        elif typing.get_origin(m) is list:
            words.append(("arrays of " if plural else "an array of ") + _describe(typing.get_args(m)[0], plural=True))
        elif typing.get_origin(m) is dict and typing.get_args(m)[1] is not Any:
            words.append(("objects of " if plural else "an object of ") + _describe(typing.get_args(m)[1], plural=True))
        else:  # dict[str, Any], a nested schema
            words.append("objects" if plural else "an object")
    return " or ".join(words)


# JSON can only carry a lone surrogate as an escape (raw bytes that aren't UTF-8 fail to parse);
# escaped pairs (an emoji, as json.dumps writes it) match too, and pass the check.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_unicode(data: Any) -> None:
    """Refuse a string or key holding a lone UTF-16 surrogate ("\\ud800"): JSON allows the escape,
    but no tokenizer or encoder takes the result. Walked without recursion, as deep as the body goes."""
    todo = [(None, data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            bad = _surrogate(value)
            if bad:
                raise APIError(400, f"'{path}' is not valid Unicode: it holds a lone surrogate ({bad})", path,
                               "invalid_value")
        elif isinstance(value, dict):
            for key, item in value.items():
                bad = _surrogate(key)
                if bad:
                    where = f"an object key in '{path}'" if path else "a key of the request body"
                    raise APIError(400, f"{where} is not valid Unicode: it holds a lone surrogate ({bad})", path,
                                   "invalid_value")
                todo.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _surrogate(text: str) -> str | None:
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return ascii(text[e.start])[1:-1]


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


# --- the model behind the API ----------------------------------------------------------------------------


class _Backend:
    """The loaded model once ready; until then the reason the API can't answer (loading, or failed)."""

    def __init__(self, llm_or_loader: "Mistral | Callable[[], Mistral]", served_model_name: str | None,
                 on_load_error: Callable[[BaseException], None] | None):
        self._source = llm_or_loader
        self._served_name = served_model_name
        self._on_load_error = on_load_error
        self._closed = False
        self.llm: Mistral | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.open_streams = 0

    def open(self) -> None:
        if callable(self._source):
            threading.Thread(target=self._load, name="mistral-loader", daemon=True).start()
        else:
            self._ready(self._source)

    def _load(self) -> None:
        try:
            llm = self._source()
        except Exception as e:  # reported by /health, and by the caller's hook or the log
            self.error = f"the model failed to load: {e}"
            if self._on_load_error is not None:
                self._on_load_error(e)
            else:
                log.error("%s", self.error)
            return
        if not self._closed:
            self._ready(llm)

    def _ready(self, llm: "Mistral") -> None:
        if self._served_name:
            llm.model_name = self._served_name  # every object the model answers with carries this name
        llm.start()  # the engine thread: one owner of the model, serving every request
        self.llm = llm
        log.info("serving %s", llm.model_name)

    def close(self) -> None:
        self._closed = True
        if self.llm is not None:
            self.llm.stop()

    def not_ready(self) -> APIError:
        return APIError(503, self.error or "the model is loading; try again shortly", code="model_not_ready")

    def get(self) -> "Mistral":
        if self.llm is None:
            raise self.not_ready()
        return self.llm

    def served(self, name: str) -> "Mistral":
        llm = self.get()
        if name != llm.model_name:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.", "model",
                           "model_not_found")
        return llm


# --- the app -------------------------------------------------------------------------------------------


def create_app(
    llm_or_loader: "Mistral | Callable[[], Mistral]",
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    on_load_error: Callable[[BaseException], None] | None = None,
    body_timeout: float = BODY_TIMEOUT_S,
    allowed_origins: list[str] | None = None,
) -> FastAPI:
    """The ASGI app. Give it a loaded `Mistral`, or a function that loads one (run on a background
    thread at startup, so that /health can answer 503 meanwhile). The app starts the model's engine
    thread once it is ready and stops it at shutdown.

    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    served_model_name: the name clients must ask for (default: the model's own `model_name`).
    on_load_error: called with the exception if the loader fails (the CLI stops the server).
    body_timeout: seconds a body may pause between two pieces before the answer is a 408.
    allowed_origins: browser origins allowed by CORS (`["*"]`: any); none by default, no CORS headers.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: give a key, or None for a server without one")
    backend = _Backend(llm_or_loader, served_model_name, on_load_error)
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
    metrics = Metrics(lambda: backend.llm.engine.stats() if backend.llm is not None else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.open()
        yield
        backend.close()

    def check_key(request: Request) -> None:
        if key_digest is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        scheme, _, token = header.partition(" ")
        # Compare digests: constant time, and the key's length doesn't leak either.
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, key_digest):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body has {int(declared)} bytes; the limit is {max_body_bytes}",
                           code="request_too_large")
        body = bytearray()
        pieces = request.stream()
        while True:  # a chunked body has no length up front: count as it comes
            try:
                piece = await asyncio.wait_for(anext(pieces, None), body_timeout)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                raise APIError(408, f"the request body stopped arriving ({body_timeout:g} s without a byte)",
                               code="request_timeout") from None
            if piece is None:
                break
            body += piece
            if len(body) > max_body_bytes:
                raise APIError(413, f"the request body is over the limit of {max_body_bytes} bytes",
                               code="request_too_large")
        # Parsing a body of megabytes takes a while: on a worker thread, so that other clients'
        # streams and /health go on meanwhile.
        req = await asyncio.to_thread(_parse_body, bytes(body), schema)
        _warn_ignored(req)
        return req

    api = APIRouter(dependencies=[Depends(check_key)])

    @api.get("/models", response_model=None, responses={200: {"model": ModelList}})
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(backend.get().model_name, backend.created)]}

    @api.get("/models/{name:path}", response_model=None, responses={200: {"model": Model}})
    async def retrieve_model(name: str) -> dict:
        return _model_card(backend.served(name).model_name, backend.created)

    @api.post("/chat/completions", **_documented(ChatCompletionRequest, ChatCompletion, ChatCompletionChunk))
    async def chat_completions(request: Request) -> Response:
        backend.get()  # 503 while loading, before reading the body
        req: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        llm = backend.served(req.model)
        return await _answer(request, bool(req.stream), llm.acreate_chat_completion(**req.given()), backend,
                             metrics)

    @api.post("/completions", **_documented(CompletionRequest, Completion, Completion))
    async def completions(request: Request) -> Response:
        backend.get()
        req: CompletionRequest = await read_body(request, CompletionRequest)
        llm = backend.served(req.model)
        return await _answer(request, bool(req.stream), llm.acreate_completion(**protocol.CompletionRequest.from_http(req.given())), backend, metrics)

    @api.get("/debug/engine")
    async def engine_state() -> dict:
        return {**backend.get().engine.debug_state(), "open_streams": backend.open_streams}

    # vLLM serves these at the root; under the API prefixes too, for clients that only know a base URL.
    tokens_api = APIRouter(dependencies=[Depends(check_key)])

    async def read_tokens_body(request: Request, schema: type[BaseModel]) -> tuple["Mistral", Any]:
        llm = backend.get()
        req = await read_body(request, schema)
        if req.model is not None:  # optional here, as in vLLM; a wrong one is still a 404
            backend.served(req.model)
        return llm, req

    @tokens_api.post("/tokenize", **_documented(TokenizeRequest, TokenizeResponse))
    async def tokenize(request: Request) -> dict:
        llm, req = await read_tokens_body(request, TokenizeRequest)
        call = asyncio.to_thread(llm.tokenize, req.prompt, messages=req.messages, tools=req.tools,
                                 continue_final_message=bool(req.continue_final_message),
                                 add_special_tokens=req.add_special_tokens)
        ids = await _calling(call)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_seq_len}

    @tokens_api.post("/detokenize", **_documented(DetokenizeRequest, DetokenizeResponse))
    async def detokenize(request: Request) -> dict:
        llm, req = await read_tokens_body(request, DetokenizeRequest)
        return {"prompt": await _calling(asyncio.to_thread(llm.detokenize, req.tokens))}

    app = FastAPI(title="Mistral-7B-Instruct-v0.3 (OpenAI-compatible)", lifespan=lifespan, redoc_url=None)
    for prefix in ("/v1", "/v3/openai"):
        app.include_router(api, prefix=prefix)
    for prefix in ("", "/v1", "/v3/openai"):
        app.include_router(tokens_api, prefix=prefix)
    app.openapi = lambda: app.openapi_schema or _openapi(app)  # /openapi.json and /docs, without a key

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> Response:
        if backend.llm is None:
            return backend.not_ready().response()
        return JSONResponse({"status": "ok", "model": backend.llm.model_name})

    @app.get("/version", response_model=None, responses={200: {"model": Version}})
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(_ClientGone)
    async def on_client_gone(request: Request, e: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request", for the log

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404:
            return APIError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url").response()
        if e.status_code == 405:
            return APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                            code="method_not_allowed").response(e.headers)  # Starlette's, with Allow
        return APIError(e.status_code, str(e.detail)).response(e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> Response:
        return APIError(400, "invalid request: " + "; ".join(str(err.get("msg")) for err in e.errors())).response()

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.").response()

    app.state.backend = backend
    app.state.metrics = metrics
    app.add_middleware(_Counted, metrics=metrics)
    if allowed_origins:
        # Outermost, so that even a 401 carries the headers a browser needs to read it.
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in allowed_origins)
    return app


class _Counted:
    """Counts each answer by route and status and times it to its last byte (a stream's too)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # its path template, without /v1 or /v3/openai: few label values
            endpoint = getattr(route, "path", None) or "unknown"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            if endpoint.endswith("completions"):
                self.metrics.e2e.observe(time.perf_counter() - start)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mistral-from-scratch")
    except PackageNotFoundError:
        return "unknown"


def _documented(schema: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel] | None = None) -> dict:
    """The OpenAPI description of a generation route. The routes read their bodies themselves (to
    count bytes and name fields as OpenAI does), so the request schema is declared here; the answers'
    schemas are response_schema.py's."""
    errors = {status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "a bad request"), (401, "a missing or wrong key"), (404, "an unknown model"), (408, "a body that stopped"),
        (413, "a body over the limit"), (429, "the queue is full"), (503, "the model is loading"))}
    ref = lambda model: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}  # noqa: E731
    if chunk is None:
        ok = {"description": f"a `{answer.__name__}`", "content": {"application/json": ref(answer)}}
    else:
        ok = {"description": f"a `{answer.__name__}`; with `stream: true`, server-sent events each holding a "
                             f"`{chunk.__name__}`, then `data: [DONE]` (OpenAI's shapes)",
              "content": {"application/json": ref(answer), "text/event-stream": ref(chunk)}}
    body = {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}
    return {"openapi_extra": {"requestBody": body}, "responses": {200: ok, **errors}}


def _openapi(app: FastAPI) -> dict:
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(title=app.title, version="1", routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest, *RESPONSES):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    app.openapi_schema = spec
    return spec


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


# --- answering -----------------------------------------------------------------------------------------


async def _answer(request: Request, stream: bool, call: Awaitable, backend: _Backend, metrics: Metrics) -> Response:
    """Run a generation call; a JSON answer, or an SSE stream once the first chunk is out."""
    start = time.perf_counter()
    if not stream:
        answer = await _unless_disconnected(request, _calling(call))
        metrics.ttft.observe(time.perf_counter() - start)  # the whole answer is its first token's arrival
        metrics.usage(answer.get("usage"))
        return JSONResponse(answer)
    chunks: AsyncIterator[dict] = await _calling(call)  # the parameters are checked here, before any chunk
    # The first chunk submits the request to the engine: a full queue is still a plain 429 answer.
    first = await _unless_disconnected(request, _calling(anext(chunks, None)))
    return StreamingResponse(_events(first, chunks, backend, metrics, start), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _calling(call: Awaitable) -> Any:
    try:
        return await call
    except RequestError as e:
        raise _from_request_error(e) from None
    except RecursionError:  # a request nested deeper than Python's stack (tools' JSON schemas)
        raise APIError(400, "the request is nested too deeply") from None


async def _unless_disconnected(request: Request, call: Awaitable) -> Any:
    """Await `call`, cancelling it if the client disconnects first (which frees its engine rows)."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the generator's `finally` cancels the request in the engine
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(first: dict | None, chunks: AsyncIterator[dict], backend: _Backend, metrics: Metrics,
                  start: float) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` per chunk, then `data: [DONE]`.

    If the client goes away, Starlette cancels this generator's task (or drops the generator): the
    CancelledError or GeneratorExit runs the `finally` of `chunks`, which cancels the request.
    """
    backend.open_streams += 1
    last = None  # when the last chunk with tokens went out
    counted = {"completion_tokens": 0}  # chunks with text, unless the stream ends with its usage

    def timed(chunk: dict) -> None:
        nonlocal last, counted
        if chunk.get("usage"):
            counted = chunk["usage"]
        if not _carries_tokens(chunk):
            return
        counted["completion_tokens"] += 1
        now = time.perf_counter()
        if last is None:
            metrics.ttft.observe(now - start)
        else:
            metrics.itl.observe(now - last)
        last = now

    try:
        if first is not None:
            timed(first)
            yield _sse(first)
        async for chunk in chunks:
            timed(chunk)
            yield _sse(chunk)
    except Exception:  # the engine failed after the 200 went out: say so in the stream, as OpenAI does
        log.exception("generation failed mid-stream")
        yield _sse(APIError(500, "The server had an error while processing your request.").body())
    finally:
        backend.open_streams -= 1
        metrics.usage(counted)
        await chunks.aclose()
    yield "data: [DONE]\n\n"


def _carries_tokens(chunk: dict) -> bool:
    for choice in chunk.get("choices", ()):
        delta = choice.get("delta", choice)  # a chat chunk's delta, or a completion chunk's choice
        if delta.get("content") or delta.get("text") or delta.get("tool_calls"):
            return True
    return False


def _sse(obj: dict) -> str:
    return f"data: {dumps(obj)}\n\n"


# --- serving with uvicorn ------------------------------------------------------------------------------


def uvicorn_config(app: FastAPI, *, header_timeout: float = HEADER_TIMEOUT_S,
                   shutdown_timeout: float = SHUTDOWN_TIMEOUT_S, **options):
    """uvicorn's Config for this app: connections that never finish their request headers are
    closed after `header_timeout` seconds (uvicorn has no such limit of its own), and on SIGTERM
    running answers get `shutdown_timeout` seconds to finish before they are cancelled. Malformed
    HTTP is answered by uvicorn itself, with a plain-text 400."""
    protocol = type("H11WithHeaderTimeout", (_H11WithHeaderTimeout,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, http=protocol, timeout_graceful_shutdown=shutdown_timeout, **options)


class _H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    `header_timeout` seconds after it opened or after its last answer. The body has its own limit
    (`body_timeout`, in the app)."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._restart_header_timer()

    def connection_lost(self, exc) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)

    def _restart_header_timer(self) -> None:
        self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        # IDLE: no complete request line and headers since the timer started.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

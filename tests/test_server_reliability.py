"""The server under cancellation, hostile input and stuck clients.

Real servers on loopback (uvicorn in a thread, as in test_server.py's 429 test, or `mistral serve` in
a subprocess where a signal is the point), driven by httpx and raw sockets. Each test here failed
before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

uvicorn = pytest.importorskip("uvicorn")

from mistral.args import preset  # noqa: E402
from mistral.generate import Mistral  # noqa: E402
from mistral.make_random import make_random  # noqa: E402
from mistral.server import create_app, uvicorn_config  # noqa: E402

from test_server import check_error, free_port, wait_healthy  # noqa: E402

KEY = "sk-reliability"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MAX_SEQ_LEN = 128
CHAT, TEXT_PATH = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random(tmp_path_factory.mktemp("reliability"), preset("small"), "consolidated", "float32")


@pytest.fixture(scope="module")
def loaded(weights) -> Mistral:
    return Mistral.from_pretrained(weights, "cpu", kernels="torch", max_batch=4, max_seq_len=MAX_SEQ_LEN,
                                   model_name="small", quiet=True)


def fresh(loaded: Mistral, max_batch: int = 4) -> Mistral:
    """A new engine over the loaded weights: each server owns its engine thread."""
    return Mistral(loaded.model, loaded.tokenizer, model_name="small", max_batch=max_batch, max_seq_len=MAX_SEQ_LEN,
                   fixed_batch_shape=True)


@contextlib.contextmanager
def serving(app, **config):
    """uvicorn on a free loopback port in a thread, configured as `mistral serve` configures it; yields
    the root URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(root, timeout=30)
        yield root
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(loaded):
    with serving(create_app(fresh(loaded), api_key=KEY)) as root:
        yield root


def engine_state(root: str) -> dict:
    r = httpx.get(f"{root}/v1/debug/engine", headers=HEADERS, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(root: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine_state(root)
        if s["running"] == 0 and s["waiting"] == 0 and s["free_rows"] == s["max_batch"]:
            return s
        assert time.monotonic() < deadline, f"the engine is still busy: {s}"
        time.sleep(0.01)


# --- one cancellation must not fail every request ---------------------------------------------------------


def test_a_stop_string_with_more_choices_than_rows_is_a_200(server):
    """The case that once failed: n=8 on 4 rows, and a stop string that matches while 4 choices
    wait; each match cancels a running sequence. Was a 500 (every sequence failed)."""
    body = {"model": "small", "messages": [{"role": "user", "content": "Hi"}], "n": 8, "stop": ["e"],
            "max_tokens": 30, "seed": 2}
    r = httpx.post(server + CHAT, json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(8))
    reasons = [c["finish_reason"] for c in choices]
    assert reasons.count("stop") >= 5, reasons  # the stop string really matched, early enough to matter
    assert all("e" not in c["message"]["content"] for c in choices)
    wait_idle(server)


# --- lone surrogates: JSON allows the escape, nothing downstream takes it ----------------------------------

GOOD = {"model": "small", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
SURROGATES = [  # (path, body, the param named)
    (CHAT, {**GOOD, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    (TEXT_PATH, {"model": "small", "prompt": "x\udfff", "max_tokens": 2}, "prompt"),
    (TEXT_PATH, {"model": "small", "prompt": ["ok", "\udc00"], "max_tokens": 2}, "prompt[1]"),
    (CHAT, {**GOOD, "tools": [{**TOOL, "function": {**TOOL["function"], "description": "\ud800"}}]},
     "tools[0].function.description"),
    (CHAT, {**GOOD, "model": "\ud800"}, "model"),
    (CHAT, {**GOOD, "logit_bias": {"\ud800": 1}}, "logit_bias"),
    (CHAT, {"\ud800": 1}, None),
]


@pytest.mark.parametrize("path, body, param", SURROGATES, ids=[case[2] or "a key" for case in SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    content = json.dumps(body).encode()  # ensure_ascii: the surrogate goes out as \\udXXX, as a client may send it
    r = httpx.post(server + path, content=content, headers=HEADERS, timeout=30)
    error = check_error(r, 400, param, "invalid_value")
    assert "surrogate" in error["message"] and "got an object" not in error["message"]


def test_an_escaped_surrogate_pair_is_fine(server):
    body = {**GOOD, "messages": [{"role": "user", "content": "Hi \U0001F600"}]}  # json.dumps writes \\ud83d\\ude00
    r = httpx.post(server + CHAT, content=json.dumps(body).encode(), headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text


# --- connections: stuck clients, errors that end a connection, methods --------------------------------------


def raw_connection(root: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(root.rsplit(":", 1)[1])), timeout=30)


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it was still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while piece := sock.recv(65536):
            received += piece
        return received
    except TimeoutError:
        return None


@pytest.fixture(scope="module")
def impatient(loaded):
    """A server with short limits for half-sent requests: 1 s for headers, 1 s of pause in a body."""
    with serving(create_app(fresh(loaded), api_key=KEY, body_timeout=1.0), header_timeout=1.0) as root:
        yield root


def test_half_sent_headers_are_dropped(impatient):
    with raw_connection(impatient) as idle, raw_connection(impatient) as partial:
        partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert closed_within(idle, 10) == b""  # was: held forever
        assert closed_within(partial, 10) == b""
    with raw_connection(impatient) as keep_alive:  # the same after a first answer on the connection
        keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        keep_alive.sendall(b"GET /hea")
        assert closed_within(keep_alive, 10).startswith(b"HTTP/1.1 200")


def test_a_half_sent_body_is_a_408(impatient):
    payload = json.dumps(GOOD).encode()
    with raw_connection(impatient) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                     + payload[:10])
        answer = closed_within(sock, 10)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.fixture(scope="module")
def broken(weights):
    """A server whose model fails in every forward pass: a fault of ours, not of the request."""
    llm = Mistral.from_pretrained(weights, "cpu", kernels="torch", max_batch=2, max_seq_len=MAX_SEQ_LEN,
                                  model_name="small", quiet=True)
    llm.model.norm.weight = torch.nn.Parameter(torch.ones(3), requires_grad=False)  # the wrong width
    with serving(create_app(llm, api_key=KEY)) as root:
        yield root


def test_a_500_tells_a_keep_alive_client_the_connection_ends(broken):
    with httpx.Client(timeout=30, headers=HEADERS) as http:
        for _ in range(3):  # each on the client's pool: was a ReadError on the reused connection
            r = http.post(broken + CHAT, json=GOOD)
            check_error(r, 500)
            assert r.headers["connection"] == "close"
            assert http.get(broken + "/health").status_code == 200


def test_405_names_the_allowed_methods(server):
    r = httpx.get(server + CHAT, headers=HEADERS)
    check_error(r, 405, None, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_an_empty_api_key_is_refused(loaded):
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(loaded, api_key="")
    run = subprocess.run([sys.executable, "-m", "mistral.cli", "serve", "nowhere", "--api-key", " "],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--api-key is empty" in run.stderr and "Traceback" not in run.stderr


def test_sigterm_under_load_finishes_running_streams_then_exits_0(weights, tmp_path):
    """`mistral serve` with a stream running and a client stuck half-way through its body: SIGTERM
    lets the stream finish, drops the stuck one at the shutdown limit, and the process exits 0
    (was: never exited while the half-sent body was held)."""
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "mistral.cli", "serve", str(weights), "--port", str(port), "--served-model-name",
           "small", "--max-batch", "2", "--max-seq-len", str(MAX_SEQ_LEN), "--device", "cpu", "--kernels", "torch",
           "--threads", "1", "--shutdown-timeout", "4"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "MISTRAL_API_KEY": ""})
    try:
        wait_healthy(root, process=process, log=log)
        stuck = raw_connection(root)
        stuck.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        body = {"model": "small", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 40,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", root + CHAT, json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - start < 20
        stuck.close()
    finally:
        if process.poll() is None:
            process.kill()


# --- chaos: disconnects, stop strings, n > 1, more requests than rows ---------------------------------------


def test_chaos_then_every_row_free_and_greedy_answers_unchanged(loaded):
    """scripts/chaos.py with small bounds: 10 clients on 4 rows for 8 s. Then the same greedy request
    on this server and on a fresh one must give the same text: nothing the storm left behind (a
    row's cache, penalties, bias) may leak into later answers."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from chaos import chaos

    probe = {"model": "small", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 20,
             "temperature": 0, "ignore_eos": True}
    with serving(create_app(fresh(loaded), api_key=KEY)) as root:
        stats, failures = asyncio.run(chaos(root, "small", KEY, clients=10, seconds=8, disconnect=0.3, seed=1))
        assert not failures, "\n".join(failures[:10])
        assert stats["complete"] >= 10 and stats["disconnected"] >= 3, stats
        wait_idle(root)
        after = httpx.post(root + CHAT, json=probe, headers=HEADERS, timeout=60).json()
    with serving(create_app(fresh(loaded), api_key=KEY)) as root:
        fresh_answer = httpx.post(root + CHAT, json=probe, headers=HEADERS, timeout=60).json()
    assert after["choices"][0]["message"]["content"] == fresh_answer["choices"][0]["message"]["content"]


# --- fuzzing the request schema ------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=6) | st.sampled_from(
    ["\ud800", "a\udfffb", "\U0001F600", "", " ", "[INST]", "</s>"])  # lone surrogates included
VALUE = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=10)
KNOWN = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
         "seed", "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "top_k",
         "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "user",
         "continue_final_message", "response_format"]
FIELD = st.sampled_from(KNOWN) | TEXT  # unknown names too: a 4xx, or a 200 where a server is lenient about them


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([CHAT, TEXT_PATH]), changes=st.dictionaries(FIELD, VALUE, max_size=4),
       whole=st.none() | VALUE)
def test_fuzzed_requests_never_get_a_5xx(server, path, changes, whole):
    """Hypothesis against the real server: any JSON (NaN, Infinity, huge integers, lone surrogates,
    unknown fields, a body that is no object) gets a 2xx or a 4xx, and every error OpenAI's shape."""
    body = {**GOOD, "prompt": "Hi"} if path == TEXT_PATH else dict(GOOD)
    body.update(changes)
    for field in ("max_tokens", "n"):  # keep the valid ones short
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool):
            body[field] = min(body[field], 2)
    if "max_tokens" in body:
        body.pop("max_completion_tokens", None)
    content = json.dumps(whole if whole is not None else body)  # allow_nan: NaN and Infinity as Python writes them
    r = httpx.post(server + path, content=content, headers=HEADERS, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        check_error(r, r.status_code, r.json()["error"]["param"], r.json()["error"]["code"])


# --- the published schema --------------------------------------------------------------------------------------


def test_openapi_schema_and_docs_are_published(server):
    """/openapi.json is a valid OpenAPI document whose request schemas agree with what the server
    accepts and refuses; /docs serves the interactive page. Both were 404."""
    validator = pytest.importorskip("openapi_spec_validator")
    jsonschema = pytest.importorskip("jsonschema")
    spec = httpx.get(server + "/openapi.json", timeout=10).json()
    validator.validate(spec)
    post = spec["paths"][CHAT]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
    schema = {**spec["components"]["schemas"]["ChatCompletionRequest"], "components": spec["components"]}
    check = jsonschema.Draft202012Validator(schema)
    for body in (GOOD, {**GOOD, "temperature": "hot"}, {**GOOD, "stream_options": {"include_usage": 1}},
                 {k: v for k, v in GOOD.items() if k != "messages"}):
        r = httpx.post(server + CHAT, json=body, headers=HEADERS, timeout=30)
        assert check.is_valid(body) == (r.status_code == 200), (body, r.text)
    check_error(httpx.post(server + CHAT, json={**GOOD, "temperature": "hot"}, headers=HEADERS, timeout=30), 400,
                "temperature", "invalid_type")
    docs = httpx.get(server + "/docs", timeout=10)
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_published_answer_schemas_hold_for_real_answers(server):
    """Each 200 of /openapi.json names a schema, and the server's real answers validate against it:
    chat (plain, with logprobs and n, streamed chunks with usage), completions (plain and streamed,
    with logprobs), the model list and a model. A schema that drifted from the answers fails here."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = httpx.get(server + "/openapi.json", timeout=10).json()

    def validator(path: str, method: str, content: str = "application/json"):
        ref = spec["paths"][path][method]["responses"]["200"]["content"][content]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        return name, jsonschema.Draft202012Validator({**spec["components"]["schemas"][name], "components": spec["components"]})

    def events(r: httpx.Response) -> list[dict]:
        data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]

    name, chat = validator(CHAT, "post")
    assert name == "ChatCompletion"
    for body in (GOOD, {**GOOD, "n": 2, "logprobs": True, "top_logprobs": 2, "temperature": 1.0, "seed": 1}):
        r = httpx.post(server + CHAT, json=body, headers=HEADERS, timeout=60)
        assert r.status_code == 200
        chat.validate(r.json())
    name, chunk = validator(CHAT, "post", "text/event-stream")
    assert name == "ChatCompletionChunk"
    r = httpx.post(server + CHAT, json={**GOOD, "stream": True, "stream_options": {"include_usage": True},
                                         "logprobs": True}, headers=HEADERS, timeout=60)
    chunks = events(r)
    assert len(chunks) >= 3 and chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    for c in chunks:
        chunk.validate(c)
    text_body = {"model": "small", "prompt": "Hi", "max_tokens": 2, "logprobs": 2}
    name, text = validator(TEXT_PATH, "post")
    assert name == "Completion"
    text.validate(httpx.post(server + TEXT_PATH, json=text_body, headers=HEADERS, timeout=60).json())
    for c in events(httpx.post(server + TEXT_PATH, json={**text_body, "stream": True}, headers=HEADERS, timeout=60)):
        text.validate(c)
    validator("/v1/models", "get")[1].validate(httpx.get(server + "/v1/models", headers=HEADERS, timeout=10).json())
    validator("/v1/models/{name}", "get")[1].validate(
        httpx.get(server + "/v1/models/small", headers=HEADERS, timeout=10).json())
    # and the schemas are not vacuous: a chat answer without choices, or a chunk of the wrong object, is refused
    assert not chat.is_valid({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "usage": {}})
    assert not chunk.is_valid({**chunks[0], "object": "chat.completion"})


def test_health_answers_while_a_4_mb_body_is_parsed_and_tokenized(server):
    """Parsing and tokenizing run on a worker thread: /health, polled meanwhile, keeps answering.
    Was: the event loop held for the whole request (3.6 s here for one 4 MB body, on a shared
    2-core machine), so the poll's slowest answer took as long as the big request."""
    async def run() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(timeout=60) as http:
            body = {**GOOD, "messages": [{"role": "user", "content": "word " * 800_000}]}
            latencies: list[float] = []
            done = asyncio.Event()

            async def poll() -> None:
                while not done.is_set():
                    start = time.monotonic()
                    assert (await http.get(server + "/health")).status_code == 200
                    latencies.append(time.monotonic() - start)
                    await asyncio.sleep(0.02)

            poller = asyncio.create_task(poll())
            await asyncio.sleep(0.1)
            start = time.monotonic()
            r = await http.post(server + CHAT, json=body, headers=HEADERS)
            took = time.monotonic() - start
            done.set()
            await poller
            check_error(r, 400, "messages", "context_length_exceeded")
            return took, latencies

    took, latencies = asyncio.run(run())
    assert max(latencies) < took / 3, (took, max(latencies), len(latencies))


def test_sse_events_survive_splitlines_readers():
    """Model text may hold U+2028, U+2029 or U+0085, which JSON leaves raw; httpx's line reader (and
    any built on str.splitlines) broke such an event in two (found by scripts/soak.py)."""
    from httpx._decoders import LineDecoder

    from mistral.responses import dumps

    chunk = {"choices": [{"delta": {"content": "a\u2028b\u2029c\x85d\ne\rf"}}]}
    lines = LineDecoder().decode(f"data: {dumps(chunk)}\n\n")
    assert lines == [lines[0], ""] and json.loads(lines[0].removeprefix("data: ")) == chunk

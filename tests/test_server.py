"""The HTTP server end to end: `mistral serve` on loopback, driven by the clients people use.

One server process serves the whole module (a small random checkpoint, 16 rows of 256 positions,
served as "mistralai/mistral-7b-instruct" with a key from $MISTRAL_API_KEY, as the provider page
has it). It is checked against independent references:

- the official `openai` clients (Python sync and async, JavaScript under Node) and curl, running the
  provider page's examples unchanged but for the base URL; every object is validated against the
  `openai` package's own types;
- mistral-common's tokenizer for `usage.prompt_tokens` (the prompt the server built);
- the library in this process (`Mistral.create_chat_completion`, the same model and decode shape)
  for greedy text: HTTP, SSE and the engine thread must not change a token;
- each request served alone, for 16 concurrent streams.

A second server, in a thread, has a loader that waits for the test (503 while loading) and one row
with a one-request queue (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
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

openai = pytest.importorskip("openai")
mistral_common = pytest.importorskip("mistral_common")
uvicorn = pytest.importorskip("uvicorn")
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402
from openai.types import Completion, CompletionUsage, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from mistral.args import preset  # noqa: E402
from mistral.generate import Mistral  # noqa: E402
from mistral.make_random import make_random  # noqa: E402
from mistral.server import create_app  # noqa: E402

MODEL = "mistralai/mistral-7b-instruct"  # the provider page's name
KEY = "sk-test-0123456789"
# A short context: examples without max_tokens run to its end. The page's examples ask for max_tokens
# 512, more than it holds, which is a 400 (as OpenAI and vLLM answer): they ask for PAGE_MAX_TOKENS here.
MAX_BATCH, MAX_SEQ_LEN = 16, 176
PAGE_MAX_TOKENS = 100
JS_DIR = Path(__file__).parent / "js"
REFERENCE_MESSAGES = [
    {"role": "system", "content": "Act like you are a helpful assistant."},
    {"role": "user", "content": "Hi there!"},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# --- the servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float = 60.0, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text() if log else process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base}/health never answered 200")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random(tmp_path_factory.mktemp("small"), preset("small"), "consolidated", "float32")


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    """`mistral serve` in a subprocess; yields its root URL (http://127.0.0.1:PORT)."""
    log = tmp_path_factory.mktemp("serve") / "output.txt"  # a file, not a pipe nobody reads
    with serving(weights, log, {**os.environ, "MISTRAL_API_KEY": KEY}, "--served-model-name", MODEL,
                 "--max-batch", str(MAX_BATCH), "--max-seq-len", str(MAX_SEQ_LEN)) as root:
        yield root


@contextlib.contextmanager
def serving(weights: Path, log: Path, env: dict, *flags: str):
    """`mistral serve WEIGHTS FLAGS` on a free loopback port, its output in `log`; yields its root URL."""
    port = free_port()
    # One CPU thread for the model: the test's clients and the server's HTTP loop share the cores, and
    # OpenMP workers that wait for a busy core make every step many times slower.
    cmd = [sys.executable, "-m", "mistral.cli", "serve", str(weights), "--port", str(port), "--device", "cpu",
           "--kernels", "torch", "--threads", "1", *flags]
    with open(log, "w") as output:  # the access log goes to stdout, the rest to stderr
        process = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(root, process=process, log=log)
        yield root
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"{server}/v3/openai"  # the provider page's base URL path


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def library(weights) -> Mistral:
    """The same model in this process, at the server's decode shape: the oracle for greedy tokens."""
    return Mistral.from_pretrained(weights, "cpu", kernels="torch", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                                   fixed_batch_shape=True, model_name=MODEL)


@contextlib.contextmanager
def one_thread():
    """Run the library as the server runs it (`--threads 1`), so even the reduction split is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_tokenizer():
    return MistralTokenizer.v3()


def prompt_tokens(reference_tokenizer, messages, tools=None) -> int:
    request = ChatCompletionRequest.from_openai(messages, tools=tools)
    return len(reference_tokenizer.encode_chat_completion(request).tokens)


def engine_state(server) -> dict:
    r = httpx.get(f"{server}/v1/debug/engine", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(server, timeout: float = 5.0) -> float:
    """Seconds until the engine has no running or waiting sequence and every row is free."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        s = engine_state(server)
        if s["running"] == 0 and s["waiting"] == 0 and s["free_rows"] == s["max_batch"]:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"the engine is still busy after {timeout} s: {engine_state(server)}")


def check_chunks(chunks: list[ChatCompletionChunk], usage: bool = False) -> str:
    """Validate a chat stream as the provider page describes it; return its text."""
    for c in chunks:
        ChatCompletionChunk.model_validate(c.to_dict())
        assert c.model == MODEL and c.object == "chat.completion.chunk"
    body = chunks[:-1] if usage else chunks
    if usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(len(c.choices) == 1 for c in body)  # what the page's JS example indexes
    assert body[0].choices[0].delta.role == "assistant"
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert len({c.id for c in chunks}) == 1
    return "".join(c.choices[0].delta.content or "" for c in body)


# --- the provider page's examples --------------------------------------------------------------------


def test_health_and_models(server, client):
    r = httpx.get(f"{server}/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    assert [Model.model_validate(m.to_dict()).id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("stream", [False, True])
def test_reference_python_example(base, reference_tokenizer, stream):
    # The page's code, with BASE and API_KEY filled in.
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    model = "mistralai/mistral-7b-instruct"
    max_tokens = PAGE_MAX_TOKENS
    chat_completion_res = client.chat.completions.create(
        model=model, messages=REFERENCE_MESSAGES, stream=stream, max_tokens=max_tokens,
    )
    if stream:
        chunks = list(chat_completion_res)
        check_chunks(chunks)
    else:
        res = ChatCompletion.model_validate(chat_completion_res.to_dict())
        assert res.model == MODEL and res.choices[0].message.role == "assistant"
        assert res.choices[0].finish_reason in ("stop", "length")
        expected = prompt_tokens(reference_tokenizer, REFERENCE_MESSAGES)
        assert res.usage.prompt_tokens == expected
        assert 1 <= res.usage.completion_tokens <= max_tokens


def test_greedy_text_is_the_librarys(client, library):
    messages = [{"role": "user", "content": "Name three rivers."}]
    with one_thread():
        expected = library.create_chat_completion(messages, max_tokens=24, temperature=0)
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert res.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert res.usage.model_dump() == CompletionUsage.model_validate(expected["usage"]).model_dump()
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True))
    assert check_chunks(chunks) == expected["choices"][0]["message"]["content"]


def test_async_client_usage_and_tools(base, reference_tokenizer):
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 21}'},
        {"role": "user", "content": "And in Lyon?"},
    ]

    async def run():
        client = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        forced = await client.chat.completions.create(
            model=MODEL, messages=messages[:1], tools=[WEATHER], tool_choice="required", max_tokens=8)
        plain = await client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=8)
        await client.close()
        return chunks, forced, plain

    chunks, forced, plain = asyncio.run(run())
    check_chunks(chunks, usage=True)
    usage = chunks[-1].usage
    assert usage.prompt_tokens == prompt_tokens(reference_tokenizer, messages, [WEATHER])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    for res in (forced, plain):
        ChatCompletion.model_validate(res.to_dict())
    assert forced.usage.prompt_tokens == prompt_tokens(reference_tokenizer, messages[:1], [WEATHER])
    assert plain.usage.prompt_tokens == prompt_tokens(reference_tokenizer, messages[:1])
    # a random model's tool call is not JSON: the forced [TOOL_CALLS] opening comes back as content or calls
    assert forced.choices[0].finish_reason in ("tool_calls", "stop", "length")


def test_continue_final_message(client, library):
    messages = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn moonlight"}]
    with one_thread():
        expected = library.create_chat_completion(messages, continue_final_message=True, max_tokens=8, temperature=0)
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"continue_final_message": True})
    assert res.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert res.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_text_completions(client, library):
    with one_thread():
        expected = library.create_completion("Once upon a time", max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    res = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=2)
    Completion.model_validate(res.to_dict())
    assert res.choices[0].text == expected["choices"][0]["text"]
    assert res.choices[0].logprobs.tokens == expected["choices"][0]["logprobs"]["tokens"]
    assert res.choices[0].logprobs.token_logprobs == expected["choices"][0]["logprobs"]["token_logprobs"]
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    for c in chunks:  # openai's type has no null finish_reason, which every chunk but the last carries
        assert c.object == "text_completion" and len(c.choices) == 1 and isinstance(c.choices[0].text, str)
    Completion.model_validate(chunks[-1].to_dict())
    assert "".join(c.choices[0].text for c in chunks) == expected["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    # the legacy endpoint's default max_tokens is 16
    assert client.completions.create(model=MODEL, prompt="Hello", temperature=0).usage.completion_tokens <= 16
    # several prompts in one request, as the openai client sends them: one choice per prompt, in order
    many = client.completions.create(model=MODEL, prompt=["Once upon a time", "Hello"], max_tokens=10, temperature=0)
    Completion.model_validate(many.to_dict())
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == expected["choices"][0]["text"]


CURL = """curl -sS "$BASE/chat/completions" \\
  -H "Content-Type: application/json" \\
  -H "Authorization: Bearer ${API_KEY}" \\
  -d '{
  "model": "mistralai/mistral-7b-instruct",
  "messages": [
    {"role": "system", "content": "Act like you are a helpful assistant."},
    {"role": "user", "content": "Hi there!"}
  ],
  "max_tokens": PAGE_MAX_TOKENSSTREAM
}'"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("stream", [False, True])
def test_reference_curl_example(base, stream):
    command = CURL.replace("PAGE_MAX_TOKENS", str(PAGE_MAX_TOKENS)).replace("STREAM", ',\n  "stream": true' if stream else "")
    out = subprocess.run(["bash", "-c", command], env={**os.environ, "BASE": base, "API_KEY": KEY},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    if not stream:
        res = ChatCompletion.model_validate(json.loads(out))
        assert res.model == MODEL and res.choices[0].finish_reason in ("stop", "length")
        return
    assert out.endswith("data: [DONE]\n\n")
    events = out.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)  # SSE framing: one `data:` line per event
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.removeprefix("data: "))) for e in events[:-1]]
    check_chunks(chunks)


@pytest.fixture(scope="module")
def node_client():
    """Install the `openai` npm package once (cached in tests/js/node_modules, git-ignored)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node and npm are needed for the JavaScript client test")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, capture_output=True,
                       timeout=300)
    return JS_DIR / "reference.mjs"


@pytest.mark.parametrize("stream", [False, True])
def test_reference_js_example(node_client, base, stream):
    env = {**os.environ, "BASE": base, "API_KEY": KEY, "STREAM": "true" if stream else "false"}
    quoted = node_client.parent / "quoted_log.mjs"  # what the example logs, as JSON (see that file)
    run = subprocess.run(["node", "--import", quoted.as_uri(), str(node_client)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if not stream:
        res = ChatCompletion.model_validate(json.loads(json.loads(run.stdout)))
        assert res.model == MODEL and res.choices[0].finish_reason in ("stop", "length")
        return
    lines = run.stdout.split("\n")
    assert lines[-1] == ""
    assert "<undefined>" not in lines[:-2]  # every chunk before the last had a delta.content
    logged = [json.loads(line) for line in lines[:-1]]
    assert logged[-1] in ("stop", "length") and len(logged) >= 3  # the role chunk, content, the finish reason
    assert all(isinstance(text, str) for text in logged[:-1])


# --- batching ----------------------------------------------------------------------------------------


def concurrent_requests() -> list[dict]:
    """16 requests of different prompt lengths, lengths and sampling settings."""
    requests = []
    for i in range(16):
        req = {"messages": [{"role": "user", "content": f"Item {i}: " + "tell me more " * i}],
               "max_tokens": 4 + i, "temperature": 0, "logprobs": True}
        if i % 4 == 3:  # sampled rows, seeded, in the same batch as greedy ones
            req.update(temperature=0.9, top_p=0.95, seed=1000 + i)
        if i % 2:
            req["extra_body"] = {"ignore_eos": True}
        requests.append(req)
    return requests


def test_concurrent_streams_get_exactly_their_own_tokens(server, base, client):
    requests = concurrent_requests()
    # Twice: the first pass leaves each prompt's blocks in the prefix cache, so that the second and the
    # batch below read the same cached blocks (a reused prefix may differ from a fresh prefill by fp
    # rounding, as README says; the claim here is that company changes nothing).
    for _ in range(2):
        alone = []
        for req in requests:
            res = client.chat.completions.create(model=MODEL, **req)
            alone.append((res.choices[0].message.content, [(t.token, t.logprob) for t in res.choices[0].logprobs.content]))
    wait_idle(server)

    async def one(client, req):
        stream = await client.chat.completions.create(model=MODEL, stream=True, **req)
        text, tokens = "", []
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs:
                tokens += [(t.token, t.logprob) for t in chunk.choices[0].logprobs.content]
        return text, tokens

    async def watch(http, done: asyncio.Event) -> int:
        most = 0
        while not done.is_set():
            r = await http.get(f"{server}/v1/debug/engine", headers={"Authorization": f"Bearer {KEY}"})
            most = max(most, r.json()["running"])
            await asyncio.sleep(0.01)
        return most

    async def run():
        client = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
        done = asyncio.Event()
        async with httpx.AsyncClient() as http:
            watcher = asyncio.create_task(watch(http, done))
            results = await asyncio.gather(*(one(client, req) for req in requests))
            done.set()
            most = await watcher
        await client.close()
        return results, most

    together, most_running = asyncio.run(run())
    assert most_running >= 8, f"the requests never ran together (at most {most_running} rows at once)"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert b == a, f"request {i} got other tokens in a batch than alone"


def test_a_disconnect_frees_the_row_within_a_few_steps(server, base):
    wait_idle(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "ignore_eos": True, "stream": True}  # no max_tokens: the rest of the context
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/chat/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        for _ in range(5):  # the role chunk and a few tokens
            while not next(lines).startswith("data: "):
                pass
        before = engine_state(server)
        assert before["running"] == 1
    wait_idle(server)
    # The engine stops stepping once idle, so `steps` counts every step the abandoned row took part in
    # (of the ~135 it had left): the one under way when the client left, and perhaps the next.
    after = engine_state(server)
    assert after["steps"] - before["steps"] <= 3 and after["open_streams"] == 0

    # The same for an answer that isn't streamed: the client leaves while it is being generated.
    payload = json.dumps({**body, "stream": False}).encode()
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        idle_steps, deadline = engine_state(server)["steps"], time.monotonic() + 30
        while (before := engine_state(server))["running"] == 0 or before["steps"] < idle_steps + 3:
            assert time.monotonic() < deadline, before
            time.sleep(0.005)
    wait_idle(server)
    assert engine_state(server)["steps"] - before["steps"] <= 3


# --- bad input -----------------------------------------------------------------------------------------

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def without(key):
    return {k: v for k, v in GOOD.items() if k != key}


BAD = [  # (name, path, body (bytes or JSON), headers beyond the key, status, param, code)
    ("malformed JSON", CHAT, b'{"model": "x", ', {}, 400, None, "invalid_json"),
    ("not UTF-8", CHAT, b'{"model": "\xff"}', {}, 400, None, "invalid_json"),
    ("an array body", CHAT, [GOOD], {}, 400, None, None),
    ("empty body", CHAT, b"", {}, 400, None, "invalid_json"),
    ("missing messages", CHAT, without("messages"), {}, 400, "messages", "missing_required_parameter"),
    ("missing model", CHAT, without("model"), {}, 400, "model", "missing_required_parameter"),
    ("max_tokens a string", CHAT, {**GOOD, "max_tokens": "5"}, {}, 400, "max_tokens", "invalid_type"),
    ("temperature a string", CHAT, {**GOOD, "temperature": "hot"}, {}, 400, "temperature", "invalid_type"),
    ("stream a string", CHAT, {**GOOD, "stream": "yes"}, {}, 400, "stream", "invalid_type"),
    ("messages a string", CHAT, {**GOOD, "messages": "Hi"}, {}, 400, "messages", "invalid_type"),
    ("a message a number", CHAT, {**GOOD, "messages": [7]}, {}, 400, "messages[0]", "invalid_type"),
    ("stop with a number", CHAT, {**GOOD, "stop": ["a", 3]}, {}, 400, "stop", "invalid_type"),
    ("include_usage a string", CHAT, {**GOOD, "stream": True, "stream_options": {"include_usage": "y"}}, {}, 400,
     "stream_options.include_usage", "invalid_type"),
    ("response_format a string", CHAT, {**GOOD, "response_format": "json"}, {}, 400, "response_format", "invalid_type"),
    ("response_format type", CHAT, {**GOOD, "response_format": {"type": "xml"}}, {}, 400, "response_format.type", None),
    ("parallel_tool_calls a string", CHAT, {**GOOD, "parallel_tool_calls": "no"}, {}, 400, "parallel_tool_calls",
     "invalid_type"),
    ("max_tokens past the context", CHAT, {**GOOD, "max_tokens": 100_000}, {}, 400, "max_tokens",
     "context_length_exceeded"),
    ("temperature too high", CHAT, {**GOOD, "temperature": 5}, {}, 400, "temperature", None),
    ("max_tokens zero", CHAT, {**GOOD, "max_tokens": 0}, {}, 400, "max_tokens", None),
    ("n zero", CHAT, {**GOOD, "n": 0}, {}, 400, "n", None),
    ("empty messages", CHAT, {**GOOD, "messages": []}, {}, 400, "messages", None),
    ("unknown role", CHAT, {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, {}, 400, "messages[0].role", None),
    ("logit_bias key", CHAT, {**GOOD, "logit_bias": {"abc": 1}}, {}, 400, "logit_bias", None),
    ("stream_options without stream", CHAT, {**GOOD, "stream_options": {"include_usage": True}}, {}, 400,
     "stream_options", None),
    ("prompt too long", CHAT, {**GOOD, "messages": [{"role": "user", "content": "hello " * 400}]}, {}, 400,
     "messages", "context_length_exceeded"),
    ("text prompt a bad list", TEXT, {"model": MODEL, "prompt": ["a", {"b": 1}]}, {}, 400, "prompt[1]", "invalid_type"),
    ("text prompt an object", TEXT, {"model": MODEL, "prompt": {"text": "a"}}, {}, 400, "prompt", "invalid_type"),
    ("text prompt too long", TEXT, {"model": MODEL, "prompt": "hello " * 400}, {}, 400, "prompt",
     "context_length_exceeded"),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-4o"}, {}, 404, "model", "model_not_found"),
    ("unknown model, text", TEXT, {"model": "gpt-4o", "prompt": "x"}, {}, 404, "model", "model_not_found"),
    ("no key", CHAT, GOOD, {"Authorization": ""}, 401, None, None),
    ("wrong key", CHAT, GOOD, {"Authorization": "Bearer sk-wrong"}, 401, None, "invalid_api_key"),
    ("wrong scheme", CHAT, GOOD, {"Authorization": f"Basic {KEY}"}, 401, None, "invalid_api_key"),
    ("a key prefix", CHAT, GOOD, {"Authorization": f"Bearer {KEY[:-1]}"}, 401, None, "invalid_api_key"),
    ("oversized body", CHAT, {**GOOD, "user": "x" * (5 * 2**20)}, {}, 413, None, "request_too_large"),
    ("unknown route", "/v1/chat/complete", GOOD, {}, 404, None, "unknown_url"),
    ("unknown route, no key", "/v2/chat/completions", GOOD, {"Authorization": ""}, 404, None, "unknown_url"),
]


def check_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    return body["error"]


@pytest.mark.parametrize("name, path, body, headers, status, param, code", BAD, ids=[case[0] for case in BAD])
def test_bad_requests_get_openai_errors(server, name, path, body, headers, status, param, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    headers = {k: v for k, v in headers.items() if v}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=content, headers=headers, timeout=30)
    check_error(r, status, param, code)


def test_oversized_chunked_body_and_wrong_method(server):
    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "x", "user": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{server}{CHAT}", content=chunks(), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    check_error(r, 413, None, "request_too_large")
    r = httpx.get(f"{server}{CHAT}", headers={"Authorization": f"Bearer {KEY}"})
    check_error(r, 405, None, "method_not_allowed")
    r = httpx.get(f"{server}/v1/models")
    check_error(r, 401)


def test_the_client_raises_the_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "top_k", "min_p", "presence_penalty",
          "min_tokens", "ignore_eos", "prompt"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"])},
                                optional={"content": JSON, "tool_calls": JSON, "tool_call_id": JSON, "name": JSON})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([CHAT, TEXT]), changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3),
       messages=st.none() | st.lists(MESSAGE, min_size=1, max_size=3))
def test_no_request_gets_a_500(server, path, changes, messages):
    body = {**GOOD, "prompt": "Hi"} if path == TEXT else dict(GOOD)
    body.pop("prompt" if path == CHAT else "messages", None)
    if messages is not None and path == CHAT:
        body["messages"] = messages
    body.update(changes)
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 2)  # keep the valid ones short
    content = json.dumps(body)  # NaN and Infinity go out as Python writes them, which json.loads reads back
    r = httpx.post(server + path, content=content, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        check_error(r, r.status_code, r.json()["error"]["param"], r.json()["error"]["code"])


def test_still_serving_after_bad_input(client, server):
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert res.usage.completion_tokens >= 1
    wait_idle(server)


def test_serve_exits_with_one_line_when_loading_fails(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mistral.cli", "serve", str(tmp_path), "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(tmp_path) in errors[0] and "Traceback" not in run.stderr, run.stderr


# --- loading and a full queue: a server in a thread ----------------------------------------------------


def test_503_while_loading_then_429_when_the_queue_is_full(library):
    release = threading.Event()

    def load() -> Mistral:  # one row, one waiting request: a second waiting one gets 429
        release.wait(30)
        return Mistral(library.model, library.tokenizer, model_name="small", max_batch=1, max_seq_len=MAX_SEQ_LEN,
                       fixed_batch_shape=True, max_waiting=1)

    port = free_port()
    root = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(load, api_key=KEY), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "small", "messages": [{"role": "user", "content": "Go on."}],  # to the end of the context
            "ignore_eos": True, "stream": True}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"{root}/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        check_error(r, 503, None, "model_not_ready")
        check_error(httpx.post(f"{root}{CHAT}", json=body, headers=headers), 503, None, "model_not_ready")
        release.set()
        wait_healthy(root)

        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", f"{root}{CHAT}", json=body, headers=headers) as running:
                lines = running.iter_lines()
                for _ in range(3):  # past the role chunk: this one holds the only row
                    while not next(lines).startswith("data: "):
                        pass
                with b.stream("POST", f"{root}{CHAT}", json=body, headers=headers) as waiting:
                    assert waiting.status_code == 200  # queued
                    for stream in (False, True):
                        r = httpx.post(f"{root}{CHAT}", json={**body, "stream": stream}, headers=headers)
                        check_error(r, 429, None, "queue_full")
                    with pytest.raises(openai.RateLimitError):
                        openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0).chat.completions.create(
                            model="small", messages=body["messages"], max_tokens=2)
        wait_idle(root)
        ok = httpx.post(f"{root}{CHAT}", json={**body, "stream": False, "max_tokens": 2}, headers=headers, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=20)

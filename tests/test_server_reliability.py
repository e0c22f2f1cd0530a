"""The server under cancellation, hostile input and stuck clients (issue 14).

Real servers on loopback (uvicorn in a thread, as in test_server.py's 429 test, or `mistral serve` in
a subprocess where a signal is the point), driven by httpx and raw sockets. Each test here failed
before its fix.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")

from mistral.args import preset  # noqa: E402
from mistral.generate import Mistral  # noqa: E402
from mistral.make_random import make_random  # noqa: E402
from mistral.server import create_app  # noqa: E402

from test_server import check_error, free_port, wait_healthy  # noqa: E402

KEY = "sk-reliability"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MAX_SEQ_LEN = 128
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


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
    """uvicorn on a free loopback port in a thread; yields the root URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
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
    """The issue's reproduction: n=8 on 4 rows, and a stop string that matches while 4 choices
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
    (TEXT, {"model": "small", "prompt": "x\udfff", "max_tokens": 2}, "prompt"),
    (TEXT, {"model": "small", "prompt": ["ok", "\udc00"], "max_tokens": 2}, "prompt[1]"),
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

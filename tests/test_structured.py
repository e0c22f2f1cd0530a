"""Constrained decoding (response_format, tool_choice) and the requests client libraries send.

Random weights write anything, so a schema whose valid outputs are bounded (enums, booleans,
bounded integers, short strings, no extra properties) is what lets them finish: every answer that
stops must then parse and validate, which random weights would never do by chance. A scripted
checkpoint (tests/scripted.py) whose greedy output calls the wrong tool shows that tool_choice
overrides the model. The clients are the real ones (openai, LangChain, litellm) against a real
server on loopback; validation is pydantic's and jsonschema's, not ours.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import socket
import sys
import threading
import time
from typing import Literal

import httpx
import jsonschema
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from mistral import Mistral
from mistral.args import preset
from mistral.errors import RequestError
from mistral.make_random import make_random, v3_tokenizer_file
from mistral.tokenizer import Tokenizer
from scripted import spell, write_scripted

pytest.importorskip("llguidance")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

KEY = "sk-structured"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    member: bool
    color: Literal["red", "green", "blue"]


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    member: bool


PERSON = {"type": "json_schema", "json_schema": {"name": "Person", "strict": True, "schema": Person.model_json_schema()}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}, "utc": {"type": "boolean"}},
    "required": ["tz", "utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_random(tmp_path_factory.mktemp("small"), preset("small"), "consolidated", "float32", seed=3)


@pytest.fixture(scope="module")
def llm(weights):
    return Mistral.from_pretrained(weights, device="cpu", kernels="torch", max_batch=16, max_seq_len=256, quiet=True)


# --- the library -----------------------------------------------------------------------------------


def test_a_refused_token_is_never_drawn():
    # Regression: a uniform draw of exactly 1.0 (24-bit noise rounded to fp32) gave +inf Gumbel noise,
    # and -inf + inf = NaN, which argmax picks: a masked token about once in 512 steps at V = 32768.
    from mistral.sampling import BatchFlags, SamplingTensors, sample

    B, V = 64, 32768
    rows = torch.zeros(B)
    mask = torch.zeros(B, V // 32, dtype=torch.int32)
    mask[:, 0] = 0b110  # tokens 1 and 2 only
    flags = BatchFlags(greedy_only=False, constrained=True)
    for step in range(64):  # 64 x 64 rows x 32768 tokens: ~8 such draws expected before the fix
        s = SamplingTensors(temperature=rows + 1, top_k=rows.long(), top_p=rows + 1, min_p=rows, presence_penalty=rows,
                            frequency_penalty=rows, repetition_penalty=rows + 1, seed=torch.arange(B),
                            step=torch.full((B,), step), ban_eos=rows.bool(), token_mask=mask)
        drawn = sample(torch.randn(B, V), s, flags, eos_id=2)
        assert set(drawn.tolist()) <= {1, 2}


def test_100_of_100_constrained_answers_validate(llm):
    answers = []
    for seed in range(10):
        result = llm.create_chat_completion(MESSAGES, response_format=PERSON, n=10, seed=100 * seed, max_tokens=80)
        answers += result["choices"]
    assert len(answers) == 100
    for choice in answers:
        assert choice["finish_reason"] == "stop", choice
        Person.model_validate_json(choice["message"]["content"])
    assert len({c["message"]["content"] for c in answers}) > 50  # sampled, not one answer forced


def test_json_object_greedy_streamed_and_text_completions(llm):
    # any object is unbounded: random weights may not close it, but what they write is one
    result = llm.create_chat_completion(MESSAGES, response_format={"type": "json_object"}, temperature=0, max_tokens=20)
    content = result["choices"][0]["message"]["content"]
    assert content.startswith("{")
    if result["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    chunks = list(llm.create_chat_completion(MESSAGES, response_format=PERSON, seed=1, max_tokens=80, stream=True))
    Person.model_validate_json("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]))
    text = llm.create_completion("A person:", response_format=PERSON, seed=2, max_tokens=80)
    assert text["choices"][0]["finish_reason"] == "stop"
    Person.model_validate_json(text["choices"][0]["text"])
    plain = llm.create_chat_completion(MESSAGES, response_format={"type": "text"}, max_tokens=6, temperature=0)
    free = llm.create_chat_completion(MESSAGES, max_tokens=6, temperature=0)
    assert plain["choices"] == free["choices"]


def test_required_and_named_tool_choice_on_random_weights(llm):
    for seed in range(4):
        # parallel calls are a list of any length, unbounded for random weights: one call each
        result = llm.create_chat_completion(MESSAGES, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=80,
                                            parallel_tool_calls=False)
        choice = result["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        check_calls(choice["message"]["tool_calls"], {"get_weather", "get_time"})
        named = {"type": "function", "function": {"name": "get_time"}}
        result = llm.create_chat_completion(MESSAGES, tools=TOOLS, tool_choice=named, seed=seed, max_tokens=80,
                                            parallel_tool_calls=False)
        (call,) = result["choices"][0]["message"]["tool_calls"]
        check_calls([call], {"get_time"})


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """Greedy output: [TOOL_CALLS] and a call of get_weather, then EOS."""
    tok = Tokenizer.from_path(v3_tokenizer_file())
    call = spell(tok, '[{"name":"get_weather","arguments":{"city":"Paris"}}]', avoid={tok.eos_id, tok.inst_end_id})
    folder = write_scripted(tmp_path_factory.mktemp("scripted"), [tok.inst_end_id, tok.tool_calls_id, *call, tok.eos_id])
    return Mistral.from_pretrained(folder, device="cpu", kernels="torch", max_batch=2, max_seq_len=256, quiet=True)


def test_a_named_tool_overrides_the_models_choice(scripted):
    free = scripted.create_chat_completion(MESSAGES, tools=TOOLS, temperature=0, max_tokens=60)
    assert free["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"  # the model's own
    named = {"type": "function", "function": {"name": "get_time"}}
    result = scripted.create_chat_completion(MESSAGES, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=60)
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    check_calls(result["choices"][0]["message"]["tool_calls"], {"get_time"})


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(weights):
    llm = Mistral.from_pretrained(weights, device="cpu", kernels="torch", max_batch=4, max_seq_len=256,
                                  fixed_batch_shape=True, quiet=True)
    requests = [
        dict(response_format=PERSON, seed=5, max_tokens=60),
        dict(temperature=0, max_tokens=30, ignore_eos=True),
        dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=6, max_tokens=60),
        dict(temperature=0.8, seed=7, max_tokens=30),
    ]

    def run(params):
        result = llm.create_chat_completion(MESSAGES, **params)["choices"][0]
        return result["message"], result["finish_reason"]

    llm.start()
    try:
        alone = [run(p) for p in requests]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(run, requests))
    finally:
        llm.stop()
    strip = lambda m: {k: v for k, v in m.items() if k != "tool_calls"} | {  # noqa: E731 (ids are fresh per answer)
        "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or ()]}
    assert [(strip(m), r) for m, r in together] == [(strip(m), r) for m, r in alone]
    Person.model_validate_json(alone[0][0]["content"])
    check_calls(alone[2][0]["tool_calls"], {"get_weather", "get_time"})


@pytest.mark.parametrize("params, param", [
    (dict(response_format="json"), "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format.type"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": []}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
     "response_format.json_schema.strict"),
    (dict(response_format=PERSON, ignore_eos=True), "ignore_eos"),
    (dict(response_format=PERSON, min_tokens=3), "min_tokens"),
    (dict(parallel_tool_calls="no", tools=TOOLS), "parallel_tool_calls"),
])
def test_bad_structured_parameters_name_the_parameter(llm, params, param):
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion(MESSAGES, **params)
    assert info.value.param == param and "\n" not in str(info.value)


def test_without_llguidance_a_constrained_request_is_a_clear_error(llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # `import llguidance` raises ImportError
    for params, param in ((dict(response_format=PERSON), "response_format"),
                          (dict(tools=TOOLS, tool_choice="required"), "tool_choice")):
        with pytest.raises(RequestError) as info:
            llm.create_chat_completion(MESSAGES, **params)
        assert info.value.param == param and "llguidance" in str(info.value)
    # tool_choice "auto" asks for nothing constrained: it still works, unconstrained
    assert llm.create_chat_completion(MESSAGES, tools=TOOLS, max_tokens=3)["choices"][0]["finish_reason"]


# --- real clients against a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm):
    yield from serve(llm)


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    """Greedy output: a JSON object that is a Member, then EOS. (A Person's text has too many quotes
    to spell with distinct tokens, as a scripted checkpoint needs.)"""
    tok = Tokenizer.from_path(v3_tokenizer_file())
    answer = spell(tok, '{"name":"Ann","age":7,"member":true}', avoid={tok.eos_id, tok.inst_end_id})
    folder = write_scripted(tmp_path_factory.mktemp("scripted_json"), [tok.inst_end_id, *answer, tok.eos_id])
    yield from serve(Mistral.from_pretrained(folder, device="cpu", kernels="torch", max_batch=1, max_seq_len=128, quiet=True))


def serve(llm):
    from mistral.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, api_key=KEY, served_model_name="small"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{root}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"{root}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


def test_openai_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model="small", messages=MESSAGES, response_format=Person, max_tokens=80,
                                               seed=4)
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_openai_streamed_tool_calls_arrive_as_openai_streams_them(client):
    stream = client.chat.completions.create(model="small", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=80, seed=9, stream=True)
    deltas = [d for chunk in stream if chunk.choices for d in chunk.choices[0].delta.tool_calls or ()]
    first, *rest = deltas
    assert first.index == 0 and first.id and first.type == "function" and first.function.name in PARAMETERS
    assert rest and all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    call = {"id": first.id, "type": "function",
            "function": {"name": first.function.name, "arguments": "".join(d.function.arguments for d in rest)}}
    check_calls([call], set(PARAMETERS))


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server, method):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(model="small", base_url=server, api_key=KEY, max_retries=0, temperature=0,
                                       max_tokens=80)
    out = chat.with_structured_output(Person, method=method).invoke("Describe a person.")
    assert isinstance(out, Person)


def test_langchain_json_mode(scripted_server):
    # json_mode asks for any JSON object, which random weights need not ever close: a checkpoint that
    # writes a Person shows the object coming through the grammar and LangChain's parser whole.
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(model="small", base_url=scripted_server, api_key=KEY, max_retries=0,
                                       temperature=0, max_tokens=60)
    out = chat.with_structured_output(Member, method="json_mode").invoke("Describe a member as JSON.")
    assert out == Member(name="Ann", age=7, member=True)


def test_unknown_and_unsupported_fields_are_ignored_with_one_warning(server, caplog):
    body = {"model": "small", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_abc123XYZdef", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_abc123XYZdef", "content": "21 C"}],
        "max_tokens": 2, "metadata": {"a": "b"}, "store": False, "service_tier": None, "reasoning_effort": "low",
        "prompt_cache_key": "k", "frobnicate": 1, "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False}}
    with caplog.at_level(logging.WARNING, logger="mistral.server"):
        r = httpx.post(f"{server}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.text.endswith("data: [DONE]\n\n")
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "mistral.server"]
    assert len(warnings) == 1, warnings
    for name in ("metadata", "store", "service_tier", "reasoning_effort", "prompt_cache_key", "frobnicate",
                 "stream_options.include_obfuscation"):
        assert name in warnings[0]
    # a supported field of the wrong type is still a 400 naming it
    r = httpx.post(f"{server}/chat/completions", json={**body, "max_tokens": "2"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_litellm_maps_the_overflow_to_context_window_exceeded(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else its import fetches a price list from the web
    litellm = pytest.importorskip("litellm")
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/small", api_base=server, api_key=KEY, messages=long, max_retries=0)
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/small", api_base=server, api_key=KEY, messages=MESSAGES, max_tokens=10_000,
                           max_retries=0)

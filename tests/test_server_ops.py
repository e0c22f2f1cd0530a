"""The server's operational surface, on a real `mistral serve` over loopback: /metrics (Prometheus
text), /tokenize and /detokenize (vLLM's shapes), CORS, /v1/health and /version, the access log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")
openai = pytest.importorskip("openai")

from mistral.args import preset  # noqa: E402
from mistral.make_random import make_random  # noqa: E402
from tests.test_server import serving as served  # noqa: E402

MODEL = "small"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random(tmp_path_factory.mktemp("ops"), preset("small"), "consolidated", "float32")


def serving(weights: Path, log: Path, *flags: str):
    env = {k: v for k, v in os.environ.items() if k != "MISTRAL_API_KEY"}
    return served(weights, log, env, "--served-model-name", MODEL, "--max-batch", "2", "--max-seq-len", "128", *flags)


@pytest.fixture(scope="module")
def server_and_log(weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "output.txt"
    with serving(weights, log, "--allowed-origins", ORIGIN) as root:
        yield root, log


@pytest.fixture(scope="module")
def server(server_and_log) -> str:
    return server_and_log[0]


def samples(server: str) -> dict[tuple, float]:
    r = httpx.get(server + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_parser.text_string_to_metric_families(r.text) for s in family.samples}


def value(figures: dict, name: str, **labels) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_requests_complete(server):
    before = samples(server)
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=-1)
    after = samples(server)

    chat = "/chat/completions"  # the route, under /v1 as under /v3/openai
    assert value(after, "mistral_requests_total", endpoint=chat, status="200") - \
        value(before, "mistral_requests_total", endpoint=chat, status="200") == 2
    assert value(after, "mistral_requests_total", endpoint=chat, status="400") - \
        value(before, "mistral_requests_total", endpoint=chat, status="400") == 1
    usage = streamed[-1].usage
    assert value(after, "mistral_prompt_tokens_total") - value(before, "mistral_prompt_tokens_total") == \
        answer.usage.prompt_tokens + usage.prompt_tokens
    assert value(after, "mistral_generation_tokens_total") - value(before, "mistral_generation_tokens_total") == \
        answer.usage.completion_tokens + usage.completion_tokens
    for histogram, more in (("mistral_time_to_first_token_seconds", 2), ("mistral_e2e_request_latency_seconds", 3)):
        assert value(after, histogram + "_count") - value(before, histogram + "_count") == more, histogram
    assert value(after, "mistral_inter_token_latency_seconds_count") > value(before, "mistral_inter_token_latency_seconds_count")
    # the engine's figures: idle now, no block held (finished prompts stay only as evictable cache)
    assert value(after, "mistral_requests_running") == 0 and value(after, "mistral_requests_waiting") == 0
    assert value(after, "mistral_kv_blocks_used") == 0 and value(after, "mistral_kv_blocks_free") > 0
    assert value(after, "mistral_prefix_cache_queries_total") > value(before, "mistral_prefix_cache_queries_total")
    assert 0 <= value(after, "mistral_prefix_cache_hit_rate") <= 1


def test_tokenize_is_mistral_tokenize(server, weights, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"messages": messages}))
    cli = lambda *args: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-m", "mistral.cli", "tokenize", str(weights), *args], check=True, capture_output=True,
        text=True).stdout)
    r = httpx.post(server + "/v1/tokenize", json={"model": MODEL, "messages": messages}, timeout=10).json()
    assert r["tokens"] == cli("--request", str(request))
    assert (r["count"], r["max_model_len"]) == (len(r["tokens"]), 128)
    text = httpx.post(server + "/tokenize", json={"prompt": "Hello there"}, timeout=10).json()
    assert text["tokens"] == cli("--text", "Hello there", "--bos")
    bare = httpx.post(server + "/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}, timeout=10).json()
    assert bare["tokens"] == text["tokens"][1:]
    back = httpx.post(server + "/detokenize", json={"tokens": bare["tokens"]}, timeout=10)
    assert back.json() == {"prompt": "Hello there"}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, None),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
])
def test_bad_tokenize_requests_name_the_field(server, path, body, param):
    r = httpx.post(server + "/v1" + path, json=body, timeout=10)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error


def test_cors_preflight_and_simple_request(server):
    r = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=10)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    simple = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(server + "/v1/models", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers
    refused = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, timeout=10)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_health_version_and_access_log(server_and_log):
    server, log = server_and_log
    for path in ("/health", "/v1/health"):
        r = httpx.get(server + path, timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL}
    version = httpx.get(server + "/version", timeout=10).json()["version"]
    from importlib.metadata import version as installed
    assert version == installed("mistral-from-scratch")
    assert '"GET /version HTTP/1.1" 200' in log.read_text()


def test_no_access_log(weights, tmp_path):
    log = tmp_path / "output.txt"
    with serving(weights, log, "--no-access-log") as root:
        assert httpx.get(root + "/version", timeout=10).status_code == 200
        # without --allowed-origins, no CORS headers at all
        r = httpx.get(root + "/health", headers={"Origin": ORIGIN}, timeout=10)
        assert "access-control-allow-origin" not in r.headers
    assert "GET /version" not in log.read_text()


def test_published_schemas_hold_for_the_new_answers(server):
    jsonschema = pytest.importorskip("jsonschema")
    spec = httpx.get(server + "/openapi.json", timeout=10).json()

    def check(path: str, method: str, answer: dict) -> None:
        ref = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
        jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(answer)

    tokens = httpx.post(server + "/tokenize", json={"prompt": "Hi"}, timeout=10).json()
    check("/tokenize", "post", tokens)
    check("/v1/detokenize", "post", httpx.post(server + "/v1/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json())
    check("/version", "get", httpx.get(server + "/version", timeout=10).json())
    with pytest.raises(jsonschema.ValidationError):
        check("/tokenize", "post", {"tokens": ["a"], "count": 1, "max_model_len": 8})
    assert "/metrics" in spec["paths"] and "/v1/health" in spec["paths"]

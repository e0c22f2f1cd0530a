"""The paged KV cache through a real server on loopback and the openai client: prefix reuse
reported as usage.prompt_tokens_details.cached_tokens, and chunked prefill that keeps streams going
while a long prompt is read."""

from __future__ import annotations

import asyncio
import os
import time

import openai
import pytest

from mistral.args import preset
from mistral.make_random import make_random
from test_server import KEY, serving

MODEL = "paged"
SYSTEM = "You answer questions about the weather in a calm and friendly tone. " * 12  # ~170 tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    weights = make_random(tmp_path_factory.mktemp("small"), preset("small"), "consolidated", "float32")
    log = tmp_path_factory.mktemp("serve") / "output.txt"
    with serving(weights, log, {**os.environ, "MISTRAL_API_KEY": KEY}, "--served-model-name", MODEL,
                 "--max-batch", "4", "--max-seq-len", "3072", "--prefill-chunk", "128") as root:
        yield f"{root}/v1"


def test_cached_tokens_count_the_shared_prefix(base):
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)

    def chat(user, **kw):
        return client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], **kw)

    first = chat("Is it raining in Paris?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = chat("Is it sunny in Lyon?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    # [INST] and the system prompt are shared; the user's question is not
    assert 16 <= cached <= second.usage.prompt_tokens - 8 and cached % 16 == 0
    chunks = list(chat("Is it windy in Nice?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    text = client.completions.create(model=MODEL, prompt=SYSTEM + " Is it foggy?", max_tokens=2)
    again = client.completions.create(model=MODEL, prompt=SYSTEM + " Is it cold?", max_tokens=2)
    assert text.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= 128


def test_streams_go_on_while_a_long_prompt_is_read(base):
    """Three streams are running when a ~2,500-token prompt arrives: read 128 tokens a step, it lets
    each of them produce tokens before its own first token comes."""
    long_prompt = "The forecast for every town along the coast calls for light rain in the morning. " * 150

    async def run():
        client = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
        times: dict[int, list[float]] = {k: [] for k in range(3)}
        started = asyncio.Event()

        async def stream(k):
            s = await client.completions.create(model=MODEL, prompt=f"Count {k}:", max_tokens=300, stream=True,
                                                extra_body={"ignore_eos": True})
            async for _ in s:
                times[k].append(time.monotonic())
                if all(len(t) >= 3 for t in times.values()):
                    started.set()

        async def long():
            await started.wait()
            sent = time.monotonic()
            s = await client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1, stream=True)
            async for _ in s:
                return sent, time.monotonic()

        *_, (sent, first) = await asyncio.gather(*(stream(k) for k in range(3)), long())
        await client.close()
        return times, sent, first

    times, sent, first = asyncio.run(run())
    for k, t in times.items():
        during = [x for x in t if sent < x < first]
        assert len(during) >= 5, f"stream {k} got {len(during)} tokens while the long prompt was read"

"""The generator: OpenAI shapes, greedy equality with transformers, sampling controls, tool calls, errors."""

import json
import re

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import MistralForCausalLM

from mistral import Mistral
from mistral.args import preset
from mistral.engine import GenerationParams, TokenEvent
from mistral.errors import RequestError
from mistral.make_random import make_random, v3_tokenizer_file
from mistral.prompt import encode_chat

from scripted import spell, write_scripted

MESSAGES = [
    {"role": "system", "content": "Act like you are a helpful assistant."},
    {"role": "user", "content": "Hi there!"},
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_random(root / "hf", preset("small"), "hf", "float32", seed=5)
    return make_random(root / "consolidated", preset("small"), "consolidated", "float32", seed=5), root / "hf"


@pytest.fixture(scope="module")
def llm(weights):
    return Mistral.from_pretrained(weights[0], device="cpu", kernels="torch", max_batch=4, max_seq_len=256, quiet=True)


@pytest.fixture(scope="module")
def oracle(weights):
    return MistralForCausalLM.from_pretrained(weights[1], dtype=torch.float32).eval()


def content_of(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- shapes ------------------------------------------------------------------------------------------


def test_every_object_validates_against_openai_types(llm):
    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=8, stream=True, logprobs=True, top_logprobs=2,
                                             stream_options={"include_usage": True}, seed=1))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        json.dumps(chunk)  # plain data
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chat-")

    completion = llm.create_chat_completion(MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3)
    ChatCompletion.model_validate(completion)
    assert completion["object"] == "chat.completion"
    assert set(completion["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                        "prompt_tokens_details", "completion_tokens_details"}

    text = llm.create_completion("The capital of France is", max_tokens=6)
    Completion.model_validate(text)
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    chunks = list(llm.create_completion("Hello", max_tokens=4, stream=True, stream_options={"include_usage": True}))
    # openai's Completion type insists on a finish_reason, which only the last text chunk has (the
    # client builds streamed chunks without validation); every chunk has the same fields
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    for chunk in chunks[-2:]:
        Completion.model_validate(chunk)
    assert all(c.keys() == chunks[-2].keys() and c["choices"][0].keys() == chunks[-2]["choices"][0].keys() for c in chunks[:-1])


def test_no_usage_chunk_unless_asked(llm):
    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=4, stream=True))
    assert all(c["choices"] for c in chunks)  # the reference JS example reads choices[0] of every chunk
    assert "usage" not in chunks[-1]


# --- greedy equality ---------------------------------------------------------------------------------


@torch.inference_mode()
def test_greedy_tokens_equal_transformers_generate(llm, oracle):
    prompt = encode_chat(llm.tokenizer, MESSAGES)
    expected = oracle.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    got = []
    llm.engine.add(prompt, GenerationParams(max_tokens=30, temperature=0, ignore_eos=True),
                   lambda ev: got.append(ev.token) if isinstance(ev, TokenEvent) else None)
    llm.engine.run_until_idle()
    assert got == expected

    # and through the chat API: the text is the decode of those tokens (random weights: no EOS within 30)
    if llm.tokenizer.eos_id not in expected:
        completion = llm.create_chat_completion(MESSAGES, max_tokens=30, temperature=0)
        assert completion["choices"][0]["message"]["content"] == llm.tokenizer.decode(expected)


@torch.inference_mode()
def test_text_completion_greedy_equals_transformers(llm, oracle):
    ids = llm.tokenizer.encode("Once upon a time", bos=True)
    expected = oracle.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
    text = llm.create_completion("Once upon a time", max_tokens=12, temperature=0, ignore_eos=True)
    assert text["choices"][0]["text"] == llm.tokenizer.decode(expected)


def test_completion_of_several_prompts_and_of_token_ids(llm):
    """prompt as a list: n choices per prompt, numbered prompt by prompt, each what the prompt alone gives;
    token ids are taken as they are (no BOS added)."""
    one = {p: llm.create_completion(p, max_tokens=6, temperature=0, ignore_eos=True) for p in ("Once upon", "The river")}
    both = llm.create_completion(["Once upon", "The river"], n=2, max_tokens=6, temperature=0, ignore_eos=True)
    Completion.model_validate(both)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in both["choices"]] == [one["Once upon"]["choices"][0]["text"]] * 2 + \
        [one["The river"]["choices"][0]["text"]] * 2
    assert both["usage"]["prompt_tokens"] == sum(one[p]["usage"]["prompt_tokens"] for p in one)  # once per prompt
    assert both["usage"]["completion_tokens"] == 4 * 6

    ids = llm.tokenizer.encode("Once upon", bos=True)
    by_ids = llm.create_completion(ids, max_tokens=6, temperature=0, ignore_eos=True)
    assert by_ids["choices"][0]["text"] == one["Once upon"]["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    streamed = list(llm.create_completion([ids[1:], "The river"], max_tokens=6, temperature=0, ignore_eos=True, stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
    assert texts[1] == one["The river"]["choices"][0]["text"]  # ids[1:] has no BOS: a different prompt, any text

    for bad, param in (([], "prompt"), (["a", 5], "prompt[1]"), ([[1, 2], []], "prompt[1]"), ([1, 10**9], "prompt[0]"),
                       ([True, 2], "prompt[0]"), (["x"] * 17, "prompt")):
        with pytest.raises(RequestError) as e:
            llm.create_completion(bad, max_tokens=2)
        assert e.value.param == param, (bad, e.value.param, e.value.message)


def test_continue_final_message(llm):
    """The answer continues the last assistant message: the prompt is mistral-common's prefix encoding
    (checked against mistral-common in test_prompt.py), and the content is only the continuation."""
    messages = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn moonlight"}]
    ids = encode_chat(llm.tokenizer, messages, continue_final_message=True)
    out = llm.create_chat_completion(messages, continue_final_message=True, max_tokens=8, temperature=0, ignore_eos=True)
    ChatCompletion.model_validate(out)
    same = llm.create_completion(ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 8
    assert out["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    for kwargs, param in (({}, "messages[1].role"), ({"continue_final_message": "yes"}, "continue_final_message"),
                          ({"continue_final_message": True, "tool_choice": "required",
                            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                           "continue_final_message")):
        with pytest.raises(RequestError) as e:
            llm.create_chat_completion(messages, max_tokens=2, **kwargs)
        assert e.value.param == param, (kwargs, e.value.param, e.value.message)


def test_streamed_content_equals_non_streamed(llm):
    full = llm.create_chat_completion(MESSAGES, max_tokens=25, temperature=0)
    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=25, temperature=0, stream=True))
    assert content_of(chunks) == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_prompt_tokens_equal_mistral_common(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    reference = MistralTokenizer.from_file(str(v3_tokenizer_file()))
    for tools_ in (None, tools):
        request = ChatCompletionRequest.from_openai(MESSAGES, tools=tools_)
        expected = len(reference.encode_chat_completion(request).tokens)
        usage = llm.create_chat_completion(MESSAGES, tools=tools_, max_tokens=2)["usage"]
        assert usage["prompt_tokens"] == expected
        assert usage["total_tokens"] == expected + usage["completion_tokens"]


# --- sampling ------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output(llm):
    def run(seed):
        return llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=1.0, seed=seed)["choices"][0]["message"]["content"]

    assert run(42) == run(42)
    assert len({run(42), run(43), run(44)}) == 3


def test_seeded_sampling_does_not_depend_on_neighbours(llm):
    alone = llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    # the same request as the second of two choices in one batch: choice i gets seed + i
    both = llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=0.9, top_p=0.9, seed=6, n=2)
    assert both["choices"][1]["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_top_k_1_is_greedy(llm):
    greedy = llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=0)
    top1 = llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert top1["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_stop_string_is_cut(llm):
    full = llm.create_chat_completion(MESSAGES, max_tokens=40, temperature=0)["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip(), full
    expected = full[: full.index(stop)]
    for stream in (False, True):
        result = llm.create_chat_completion(MESSAGES, max_tokens=40, temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(result)
            text, reason = content_of(chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = result["choices"][0]["message"]["content"], result["choices"][0]["finish_reason"]
        assert text == expected
        assert reason == "stop"


def test_max_tokens_gives_length(llm):
    result = llm.create_chat_completion(MESSAGES, max_tokens=5, temperature=0, ignore_eos=True)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5


def test_eos_stops_and_min_tokens_and_ignore_eos(llm):
    eos = {str(llm.tokenizer.eos_id): 100}  # make EOS the certain choice
    stopped = llm.create_chat_completion(MESSAGES, max_tokens=10, logit_bias=eos)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["message"]["content"] == ""

    held = llm.create_chat_completion(MESSAGES, max_tokens=10, logit_bias=eos, min_tokens=4)
    assert held["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 5  # 4 tokens with EOS banned, then EOS

    ignored = llm.create_chat_completion(MESSAGES, max_tokens=6, logit_bias=eos, ignore_eos=True)
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 6


def test_n_choices(llm):
    result = llm.create_chat_completion(MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in result["choices"]}) == 3
    assert result["usage"]["completion_tokens"] == 24
    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=11, stream=True))
    for i in range(3):
        mine = [c for c in chunks if c["choices"][0]["index"] == i]
        assert content_of(mine) == result["choices"][i]["message"]["content"]


def test_logprobs_are_consistent(llm):
    result = llm.create_chat_completion(MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    entries = result["choices"][0]["logprobs"]["content"]
    assert len(entries) == 6
    for e in entries:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert e["logprob"] == pytest.approx(tops[0])  # greedy picked the most likely token
        assert all(t <= 0 for t in tops) and sum(torch.tensor(tops).exp()) <= 1 + 1e-6
        assert e["token"] == e["top_logprobs"][0]["token"]
    assert "".join(e["token"] for e in entries).strip() == result["choices"][0]["message"]["content"].strip()


def test_logit_bias_forces_a_token(llm):
    token = llm.tokenizer.encode("hello")[0]  # "▁hell"
    result = llm.create_chat_completion(MESSAGES, max_tokens=3, temperature=1.0, logit_bias={token: 100}, seed=1)
    assert result["choices"][0]["message"]["content"] == llm.tokenizer.decode([token] * 3)


def test_breaking_out_of_a_stream_frees_its_row(llm):
    for chunk in llm.create_chat_completion(MESSAGES, max_tokens=50, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            break
    llm.engine.step()  # the cancellation takes effect at the next step boundary
    stats = llm.engine.debug_state()
    assert stats["running"] == 0 and stats["free_rows"] == stats["max_batch"]


# --- tool calls (a scripted model that decides to call a tool) ---------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from mistral.tokenizer import Tokenizer

    tok = Tokenizer.from_path(v3_tokenizer_file())
    call = spell(tok, '[{"name":"get_weather","arguments":{"city":"Paris"}}]', avoid={tok.eos_id, tok.inst_end_id})
    chain = [tok.inst_end_id, tok.tool_calls_id, *call, tok.eos_id]  # after [/INST]: a tool call, then EOS
    folder = write_scripted(tmp_path_factory.mktemp("scripted"), chain)
    return Mistral.from_pretrained(folder, device="cpu", kernels="torch", max_batch=2, max_seq_len=256, quiet=True)


def test_tool_call_comes_back_as_tool_calls(scripted):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    result = scripted.create_chat_completion(messages, tools=TOOLS, temperature=0, max_tokens=40)
    ChatCompletion.model_validate(result)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    chunks = list(scripted.create_chat_completion(messages, tools=TOOLS, temperature=0, max_tokens=40, stream=True))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    # as OpenAI streams a call: index, id, type and name first, then the arguments in pieces
    first, *rest = deltas
    assert first["index"] == 0 and re.fullmatch(r"[A-Za-z0-9]{9}", first["id"]) and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert len(rest) > 1 and all(set(d) == {"index", "function"} and d["index"] == 0 for d in rest)
    assert json.loads("".join(d["function"]["arguments"] for d in rest)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert content_of(chunks) == ""


def test_tool_choice_none_bans_the_call(scripted):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    result = scripted.create_chat_completion(messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=5)
    assert "tool_calls" not in result["choices"][0]["message"]
    assert result["choices"][0]["finish_reason"] != "tool_calls"


def test_a_ruled_out_forced_token_has_a_json_logprob(tmp_path):
    """A forced [TOOL_CALLS] the model rules out entirely (logit -3.2e38 against +3.2e38: log p is
    -inf in float32) still gives valid JSON: -9999.0, as vLLM writes it. Was -inf: a 500 from the
    server's JSON encoder, `"logprob": -Infinity` in a stream."""
    from safetensors.torch import load_file, save_file

    from mistral.tokenizer import Tokenizer

    tok = Tokenizer.from_path(v3_tokenizer_file())
    word = spell(tok, "ok", avoid={tok.eos_id, tok.inst_end_id, tok.tool_calls_id})
    folder = write_scripted(tmp_path, [tok.inst_end_id, *word, tok.eos_id])
    tensors = load_file(str(folder / "consolidated.safetensors"))
    tensors["output.weight"][word[0], 0], tensors["output.weight"][tok.tool_calls_id, 0] = 4e37, -4e37
    save_file(tensors, str(folder / "consolidated.safetensors"))
    llm = Mistral.from_pretrained(folder, device="cpu", kernels="torch", max_batch=1, max_seq_len=64, quiet=True)
    messages = [{"role": "user", "content": "Hi"}]
    result = llm.create_chat_completion(messages, tools=TOOLS, tool_choice="required", max_tokens=2, temperature=0,
                                        logprobs=True, top_logprobs=2)
    first = result["choices"][0]["logprobs"]["content"][0]
    assert first["token"] == "[TOOL_CALLS]" and first["logprob"] == -9999.0
    json.dumps(result, allow_nan=False)  # what the server's JSONResponse does
    for chunk in llm.create_chat_completion(messages, tools=TOOLS, tool_choice="required", max_tokens=2,
                                            temperature=0, logprobs=True, stream=True):
        json.dumps(chunk, allow_nan=False)


def test_forced_tool_call_token_on_a_random_model_never_crashes(llm):
    """tool_choice=required forces [TOOL_CALLS]; random weights then write no valid JSON: it comes back as content."""
    result = llm.create_chat_completion(MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=6, temperature=0,
                                        logprobs=True)
    assert result["choices"][0]["logprobs"]["content"][0]["token"] == "[TOOL_CALLS]"
    assert isinstance(result["choices"][0]["message"]["content"], str)
    assert result["choices"][0]["finish_reason"] == "length"


# --- bad parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias['5']"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_parameters_name_the_parameter(llm, params, param):
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion(MESSAGES, **params)
    assert info.value.param == param


def test_unknown_parameter_is_a_request_error_naming_it(llm):
    """The Python API takes only the protocol's fields: a misspelt one is named, not ignored (the
    HTTP layer ignores unknown fields with a warning instead, as OpenAI's clients expect)."""
    for call, param, names in ((lambda **kw: llm.create_chat_completion(MESSAGES, **kw), "temprature", "temprature"),
                               (lambda **kw: llm.create_completion("Hi", **kw), "temprature", "temprature"),
                               (lambda **kw: llm.create_completion("Hi", stream=True, stream_options={"usage": True}),
                                "stream_options.usage", "stream_options.usage")):
        with pytest.raises(RequestError) as info:
            call(temprature=0.5, max_tokens=2)
        assert info.value.param == param and names in info.value.message, info.value.message
    with pytest.raises(RequestError, match="unknown parameters: tempr, topp"):
        llm.create_chat_completion(MESSAGES, topp=0.5, tempr=1)


def test_engine_options_reach_the_engine_and_a_misspelt_one_fails_before_the_load(llm, tmp_path):
    assert llm.engine.max_batch == 4 and llm.max_seq_len == 256  # the fixture's options
    with pytest.raises(TypeError, match="max_bach"):  # the folder is not even looked for
        Mistral.from_pretrained(tmp_path / "no-such-folder", device="cpu", max_bach=2)


def test_prompt_longer_than_the_context(llm):
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion(long)
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"
    assert str(info.value).startswith(f"This model's maximum context length is {llm.max_seq_len} tokens. However, "
                                      "your messages resulted in ")


def test_bad_messages_name_the_index(llm):
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}])
    assert info.value.param.startswith("messages[1]")


def test_a_lone_surrogate_is_a_request_error(llm):
    """SentencePiece's binding refused such a str with "Unable to cast Python instance ... to C++ type"."""
    with pytest.raises(RequestError, match=r"lone surrogate \(\\ud800 at index 1\)"):
        llm.create_chat_completion([{"role": "user", "content": "a\ud800b"}], max_tokens=2)
    with pytest.raises(RequestError, match="lone surrogate"):
        llm.create_completion("x\udfff", max_tokens=2)


def test_max_tokens_beyond_the_context_is_refused_in_openai_words(llm):
    prompt_len = len(encode_chat(llm.tokenizer, MESSAGES))
    for param in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(RequestError) as info:
            llm.create_chat_completion(MESSAGES, **{param: 10_000})
        assert info.value.param == param and info.value.code == "context_length_exceeded"
        assert str(info.value) == (
            f"This model's maximum context length is {llm.max_seq_len} tokens. However, you requested "
            f"{prompt_len + 10_000} tokens ({prompt_len} in the messages, 10000 in the completion). "
            "Please reduce the length of the messages or completion.")
    # what fits exactly is served to the last position
    result = llm.create_chat_completion(MESSAGES, max_tokens=llm.max_seq_len - prompt_len, temperature=0, ignore_eos=True)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["total_tokens"] == llm.max_seq_len

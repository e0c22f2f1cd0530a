"""The v3 chat prompt, token for token against mistral-common; request validation; tool-call parsing; the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_cases import CASES, BARE, WEATHER, assistant, calls, parts, result, system, user
from mistral.cli import main
from mistral.errors import RequestError
from mistral.prompt import encode_chat, encode_request, new_tool_call_id, parse_tool_calls, read_tool_choice
from mistral.tokenizer import Tokenizer

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

V3_FILE = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
TOK = Tokenizer.from_path(V3_FILE)
REF = MistralTokenizer.v3()


def reference_ids(body: dict) -> list[int]:
    request = ChatCompletionRequest.from_openai(
        body["messages"], tools=body.get("tools"), continue_final_message=body.get("continue_final_message", False)
    )
    return REF.encode_chat_completion(request).tokens


def show(ids: list[int]) -> str:
    return REF.instruct_tokenizer.tokenizer._to_string(ids)


# --- the prompt, against mistral-common --------------------------------------------------------------


def test_there_are_at_least_50_conversations():
    assert len(CASES) >= 50
    assert len({name for name, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("body", [b for _, b in CASES], ids=[n for n, _ in CASES])
def test_prompt_matches_mistral_common(body):
    expected = reference_ids(body)
    ours = encode_request(TOK, body)
    assert ours == expected, f"\nours: {show(ours)}\nref:  {show(expected)}"


def test_the_shape_of_a_tool_prompt():
    # Spelled out once, so that a reader sees the format without running mistral-common.
    body = dict(CASES)["call_result_answer_user"]
    text = show(encode_request(TOK, body))
    assert text.startswith('<s>[INST]▁Weather▁in▁Paris?[/INST][TOOL_CALLS]▁[{"name":▁"get_weather",▁"arguments":▁{"city":▁"Paris"},▁"id":▁"abcDEF123"}]</s>')
    assert '[TOOL_RESULTS]▁{"content":▁{"temperature":▁21},▁"call_id":▁"abcDEF123"}[/TOOL_RESULTS]' in text
    assert text.endswith("[/AVAILABLE_TOOLS][INST]▁Be▁brief.<0x0A><0x0A>Thanks!▁And▁Tokyo?[/INST]")


# --- validation ----------------------------------------------------------------------------------

CALL = calls(("abcDEF123", "ping", "{}"))

BAD_REQUESTS = [
    # (messages, options, param, words in the message)
    ([], {}, "messages", "empty"),
    ("hello", {}, "messages", "must be a list"),
    ([user("a"), "b"], {}, "messages[1]", "must be an object"),
    ([user("a"), {"role": "robot", "content": "x"}], {}, "messages[1].role", "unknown role 'robot'"),
    ([{"content": "no role"}], {}, "messages[0].role", "unknown role None"),
    ([user("a"), result("abcDEF123", "x")], {}, "messages[1].role", "tool message cannot follow a user message"),
    ([system("s"), result("abcDEF123", "x")], {}, "messages[1].role", "cannot follow a system"),
    ([user("a"), assistant("b")], {}, "messages[1].role", "last message must be a user or tool"),
    ([user("a"), system("s")], {}, "messages[1].role", "last message must be a user or tool"),
    ([user("a")], {"continue_final_message": True}, "messages[0].role", "continue_final_message needs an assistant"),
    ([user("a"), CALL], {"continue_final_message": True}, "messages[1].tool_calls", "continues text"),
    ([user("a"), {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "ping"}}]}],
     {}, "messages[1].tool_calls[0].id", "non-empty string"),
    ([user("a"), CALL, result("abcDEF12", "x")], {}, "messages[2].tool_call_id", "no tool call with id"),
    ([user("a"), CALL, {"role": "tool", "content": "x"}], {}, "messages[2].tool_call_id", "non-empty string"),
    ([user("a"), CALL, result("zzzzzzzzz", "x")], {}, "messages[2].tool_call_id", "no tool call with id 'zzzzzzzzz'"),
    ([result("abcDEF123", "x"), user("a")], {}, "messages[0].tool_call_id", "no tool call"),
    ([user("a"), CALL, result("abcDEF123", "x"), result("abcDEF123", "y")], {}, "messages[3].tool_call_id", "already answered"),
    ([user("a"), assistant("b"), result("abcDEF123", "x")], {}, "messages[2].tool_call_id", "no tool call"),
    ([user("a"), CALL, result("abcDEF123", "x"), assistant("ok"), result("abcDEF123", "x")],
     {}, "messages[4].tool_call_id", "no tool call"),
    ([user("a"), calls(("abcDEF123", "ping", "{}"), ("abcDEF124", "ping", "{}")), result("abcDEF123", "x")],
     {}, "messages[1].tool_calls", "abcDEF124"),
    ([user("a"), CALL, user("never answered")], {}, "messages[1].tool_calls", "no tool message answers"),
    ([user("a"), calls(("abcDEF123", "ping", "{}"), ("abcDEF123", "ping", "{}"))], {}, "messages[1].tool_calls[1].id", "twice"),
    ([user("a"), calls(("abcDEF123", "bad name", "{}")), result("abcDEF123", "x")], {}, "messages[1].tool_calls[0].function.name", "[A-Za-z0-9_-]"),
    ([user("a"), assistant(None), user("b")], {}, "messages[1]", "needs non-empty content or tool_calls"),
    ([user("a"), assistant(""), user("b")], {}, "messages[1]", "needs non-empty content or tool_calls"),
    ([user(parts("look", "x") + [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}])],
     {}, "messages[0].content[2].type", "image input"),
    ([user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])], {}, "messages[0].content[0].type", "audio input"),
    ([user([{"type": "video", "video": "x"}])], {}, "messages[0].content[0].type", "unknown content part type"),
    ([user([{"type": "text"}])], {}, "messages[0].content[0].text", "string 'text'"),
    ([user([{"type": "text", "text": "a"}, "b"])], {}, "messages[0].content[1]", "must be an object"),
    ([user(None)], {}, "messages[0].content", "content is required"),
    ([{"role": "user"}], {}, "messages[0].content", "content is required"),
    ([user(42)], {}, "messages[0].content", "string or a list"),
    ([system(None), user("a")], {}, "messages[0].content", "content is required"),
    ([user("a"), CALL, result("abcDEF123", [{"type": "image_url", "image_url": {"url": "x"}}])],
     {}, "messages[2].content[0].type", "image input"),
    ([user("a")], {"tools": {"not": "a list"}}, "tools", "must be a list"),
    ([user("a")], {"tools": [{"type": "retrieval"}]}, "tools[0].type", "only 'function'"),
    ([user("a")], {"tools": [{"type": "function"}]}, "tools[0].function", "'name' is required"),
    ([user("a")], {"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "1 to 64"),
    ([user("a")], {"tools": [BARE, BARE]}, "tools[1].function.name", "two tools are named 'ping'"),
    ([user("a")], {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters", "JSON schema object"),
]


@pytest.mark.parametrize("messages, options, param, words", BAD_REQUESTS)
def test_bad_requests_are_refused_naming_the_field(messages, options, param, words):
    with pytest.raises(RequestError) as e:
        encode_chat(TOK, messages, **options)
    assert e.value.param == param
    assert words in str(e.value)
    assert "\n" not in str(e.value)
    if param.startswith("messages["):  # the message names the place too, for a one-line CLI error
        assert str(e.value).startswith(re.match(r"messages\[\d+\]", param).group())


def test_request_body_errors():
    with pytest.raises(RequestError, match="JSON object"):
        encode_request(TOK, [user("a")])
    with pytest.raises(RequestError, match="no 'messages'") as e:
        encode_request(TOK, {"model": "m"})
    assert e.value.param == "messages"
    with pytest.raises(RequestError) as e:
        encode_request(TOK, {"messages": [user("a")], "continue_final_message": "yes"})
    assert e.value.param == "continue_final_message"


# --- tool_choice ---------------------------------------------------------------------------------


def test_tool_choice():
    tools = [WEATHER, BARE]
    assert read_tool_choice(None, tools) == ("auto", None)
    assert read_tool_choice(None, None) == ("none", None)
    assert read_tool_choice("none", tools).mode == "none"
    assert read_tool_choice("required", tools).mode == "required"
    assert read_tool_choice("any", tools).mode == "required"
    assert read_tool_choice({"type": "function", "function": {"name": "ping"}}, tools) == ("function", "ping")
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"type": "function"}, 3):
        with pytest.raises(RequestError) as e:
            read_tool_choice(bad, tools)
        assert e.value.param == "tool_choice"
    with pytest.raises(RequestError, match="at least one tool"):
        read_tool_choice("required", [])


# --- model output ----------------------------------------------------------------------------------


def assistant_ids(message: dict) -> list[int]:
    """The ids mistral-common writes for an assistant turn: what the model learned to generate."""
    answers = [result(c["id"], "ok") for c in message.get("tool_calls", [])]
    prompt = reference_ids({"messages": [user("q"), message, *answers, user("next")]})
    start = prompt.index(TOK.inst_end_id) + 1
    return prompt[start : prompt.index(TOK.eos_id, start) + 1]


def test_parse_plain_text():
    ids = assistant_ids(assistant("Just text, with [TOOL_CALLS] written out."))
    assert parse_tool_calls(TOK, ids) == ("Just text, with [TOOL_CALLS] written out.", None)


def test_parse_the_calls_the_model_was_taught():
    message = calls(("abcDEF123", "get_weather", '{"city": "Zürich", "unit": "celsius"}'),
                    ("abcDEF124", "ping", "{}"))
    content, tool_calls = parse_tool_calls(TOK, assistant_ids(message))
    assert content is None
    assert [c["function"]["name"] for c in tool_calls] == ["get_weather", "ping"]
    assert json.loads(tool_calls[0]["function"]["arguments"]) == {"city": "Zürich", "unit": "celsius"}
    assert tool_calls[1]["function"]["arguments"] == "{}"
    for c in tool_calls:
        assert c["type"] == "function" and re.fullmatch(r"[A-Za-z0-9]{9}", c["id"])
        assert set(c) == {"id", "type", "function"}
    assert tool_calls[0]["id"] != tool_calls[1]["id"]


def test_parse_text_then_calls_without_eos():
    ids = TOK.encode("Let me check.") + [TOK.tool_calls_id] + TOK.encode('[{"name": "ping", "arguments": {"n": [1, 2]}}]')
    content, tool_calls = parse_tool_calls(TOK, ids)
    assert content == "Let me check."
    assert json.loads(tool_calls[0]["function"]["arguments"]) == {"n": [1, 2]}


@pytest.mark.parametrize("after", [
    '[{"name": "ping", "arguments": {"n": 1',  # cut short
    "not json at all",
    '{"arguments": {}}',  # no name
    '[{"name": 3}]',
    '"just a string"',
    "[]",
])
def test_malformed_calls_come_back_as_content(after):
    ids = TOK.encode("Sure:") + [TOK.tool_calls_id] + TOK.encode(after) + [TOK.eos_id]
    assert parse_tool_calls(TOK, ids) == (TOK.decode(ids), None)


def test_new_tool_call_ids():
    ids = {new_tool_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)


def test_foreign_tool_call_ids_are_mapped_to_the_same_v3_id_in_call_and_result():
    def conversation(call_id):
        return [user("Weather?"), calls((call_id, "get_weather", '{"city": "Paris"}')), result(call_id, "21")]

    foreign = ["call_abc123XYZdef", "toolu_01A09q90qw90lq917835lq9", "a", "call-with_punct.1"]
    for call_id in foreign:
        ours = encode_chat(TOK, conversation(call_id))
        mapped = re.search(r'"id": "([A-Za-z0-9]{9})"', TOK.decode(ours)).group(1)
        assert ours == encode_chat(TOK, conversation(call_id))  # deterministic
        assert ours == reference_ids({"messages": conversation(mapped)})  # the same prompt as the 9-character id
    mapped = [re.search(r'"id": "(\w{9})"', TOK.decode(encode_chat(TOK, conversation(i)))).group(1) for i in foreign]
    assert len(set(mapped)) == len(foreign)


def test_an_assistant_message_with_text_and_calls_writes_the_text_then_the_calls():
    messages = [user("Weather?"), calls(("abcDEF123", "get_weather", "{}"), content="Let me look. "), result("abcDEF123", "21")]
    text = show(encode_chat(TOK, messages))
    assert '[/INST]▁Let▁me▁look.[TOOL_CALLS]▁[{"name":▁"get_weather",▁"arguments":▁{},▁"id":▁"abcDEF123"}]</s>' in text
    # what the model's own such answer parses back to
    answer = TOK.encode("Let me look.") + [TOK.tool_calls_id] + TOK.encode('[{"name": "get_weather", "arguments": {}}]')
    content, parsed = parse_tool_calls(TOK, answer)
    assert content == "Let me look." and parsed[0]["function"]["name"] == "get_weather"


# --- `mistral tokenize` ----------------------------------------------------------------------------


def test_cli_tokenize_request(tmp_path, capsys):
    body = dict(CASES)["parallel_calls"]
    (tmp_path / "req.json").write_text(json.dumps({"model": "mistral", **body}))
    assert main(["tokenize", str(V3_FILE), "--request", str(tmp_path / "req.json")]) == 0
    assert json.loads(capsys.readouterr().out) == reference_ids(body)


def test_cli_tokenize_text(tmp_path, capsys):
    (tmp_path / "tokenizer.model.v3").write_bytes(V3_FILE.read_bytes())
    assert main(["tokenize", str(tmp_path), "--text", " Hello  world"]) == 0
    plain = REF.instruct_tokenizer.tokenizer.encode(" Hello  world", bos=False, eos=False)
    assert json.loads(capsys.readouterr().out) == plain
    assert main(["tokenize", str(tmp_path), "--text", "Hi", "--bos"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == 1


@pytest.mark.parametrize("content, words", [
    (json.dumps({"messages": [user("a"), {"role": "robot", "content": "b"}]}), "messages[1].role: unknown role"),
    ("{not json", "not JSON"),
])
def test_cli_bad_request_is_one_line_and_nonzero(tmp_path, capsys, content, words):
    (tmp_path / "req.json").write_text(content)
    assert main(["tokenize", str(V3_FILE), "--request", str(tmp_path / "req.json")]) != 0
    out, err = capsys.readouterr()
    assert out == "" and words in err and err.count("\n") == 1


def test_cli_console_script_on_stdin():
    body = json.dumps({"messages": [system("s"), user("ça va ?")]})
    done = subprocess.run([sys.executable, "-m", "mistral.cli", "tokenize", str(V3_FILE), "--request", "-"],
                          input=body, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == reference_ids(json.loads(body))


# --- random conversations, against mistral-common ------------------------------------------------

texts = st.lists(st.sampled_from([*"ab Z09.,:{}\"'[]\\\n\t", "  ", "\n\n", "é", "中", "🧬", "\u0301", "ש", "▁", "</s>"]),
                 max_size=8).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
call_ids = st.text(st.sampled_from("abcXYZ019"), min_size=9, max_size=9)
contents = texts | st.lists(texts, max_size=3).map(lambda ts: parts(*ts))


@st.composite
def conversations(draw):
    messages, n_ids = [], 0
    if draw(st.booleans()):
        messages.append(system(draw(contents)))
    for _ in range(draw(st.integers(1, 4))):
        for _ in range(draw(st.integers(1, 2))):
            messages.append(user(draw(contents)))
            if draw(st.integers(0, 4)) == 0:
                messages.append(system(draw(contents)))
        if messages[-1]["role"] == "system":
            messages.append(user(draw(contents)))
        if draw(st.booleans()):
            specs = []
            for _ in range(draw(st.integers(1, 3))):
                n_ids += 1
                args = draw(st.one_of(json_values.map(json.dumps), st.dictionaries(texts, json_values, max_size=3), texts))
                specs.append((draw(call_ids)[:-2] + f"{n_ids:02d}", draw(st.sampled_from(["ping", "get_weather"])), args))
            messages.append(calls(*specs, content=draw(st.sampled_from([None, ""]))))
            messages += [result(i, draw(st.one_of(texts, json_values.map(json.dumps)))) for i, _, _ in specs]
        if draw(st.booleans()):
            messages.append(assistant(draw(texts.filter(lambda t: t != ""))))
    end = draw(st.sampled_from(["user", "as is", "continue"]))
    if end == "user" or messages[-1]["role"] not in ("user", "tool"):
        messages.append(user(draw(contents)))
    body = {"messages": messages, "tools": draw(st.sampled_from([None, [], [WEATHER, BARE]]))}
    if end == "continue":
        messages.append(assistant(draw(texts.filter(lambda t: t != ""))))
        body["continue_final_message"] = True
    return body


@settings(max_examples=150, deadline=None)
@given(conversations())
def test_random_conversations_match_mistral_common(body):
    assert encode_request(TOK, body) == reference_ids(body)

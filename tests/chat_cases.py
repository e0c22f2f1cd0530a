"""Conversations, as OpenAI request bodies, that our v3 prompt must encode exactly like mistral-common.

Each case is (name, body). They cover what changes tokens: multi-turn, system prompts (where they
go, how several are joined), merged consecutive messages, text parts, tools with nested schemas,
tool calls and results in every JSON shape, unicode that needs byte fallback, and whitespace at
every edge.
"""

from __future__ import annotations


def user(content):
    return {"role": "user", "content": content}


def system(content):
    return {"role": "system", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def calls(*specs, content=None):
    """An assistant message with tool calls: specs are (id, name, arguments)."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in specs
        ],
    }


def result(call_id, content, name=None):
    m = {"role": "tool", "tool_call_id": call_id, "content": content}
    if name:
        m["name"] = name
    return m


def parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights. Returns a list of offers.",
        "parameters": {
            "type": "object",
            "properties": {
                "legs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                            "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
                            "date": {"type": "string", "format": "date"},
                        },
                        "required": ["from", "to", "date"],
                    },
                    "minItems": 1,
                },
                "passengers": {
                    "type": "object",
                    "properties": {
                        "adults": {"type": "integer", "minimum": 1, "default": 1},
                        "children": {"type": "integer", "minimum": 0},
                    },
                },
                "cabin": {"anyOf": [{"type": "string", "enum": ["economy", "business"]}, {"type": "null"}]},
                "filters": {"$ref": "#/$defs/filters"},
            },
            "required": ["legs"],
            "$defs": {
                "filters": {
                    "type": "object",
                    "properties": {"max_stops": {"type": "integer"}, "airlines": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False,
                }
            },
        },
    },
}

CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Évalue une expression — 計算機 🧮",
        "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]},
        "strict": True,  # not part of the v3 prompt: must be dropped
    },
}

BARE = {"type": "function", "function": {"name": "ping"}}  # no description, no parameters

CASES: list[tuple[str, dict]] = [
    # --- plain chats ---------------------------------------------------------------------------
    ("single_user", {"messages": [user("Hello, who are you?")]}),
    ("system_then_user", {"messages": [system("You are a pirate."), user("Hi!")]}),
    ("two_turns", {"messages": [user("What is 2+2?"), assistant("4."), user("And 3+3?")]}),
    ("system_goes_to_last_user", {"messages": [
        system("Answer in French."), user("Hello"), assistant("Bonjour"), user("How are you?"),
    ]}),
    ("many_systems_joined", {"messages": [
        system("Rule one."), system("Rule two."), user("a"), assistant("b"), user("c"), system("Rule three."), user("d"),
    ]}),
    ("system_between_users_splits_turns", {"messages": [user("first"), system("sys"), user("second")]}),
    ("consecutive_users_merged", {"messages": [user("one"), user("two"), user("three")]}),
    ("consecutive_assistants_merged", {"messages": [user("q"), assistant("part A"), assistant("part B"), user("ok")]}),
    ("ten_turns", {"messages": [m for k in range(5) for m in (user(f"question {k}"), assistant(f"answer {k}"))] + [user("last")]}),
    ("starts_with_assistant", {"messages": [system("sys"), assistant("Hello, I am a bot."), user("Hi bot")]}),
    ("developer_role", {"messages": [{"role": "developer", "content": "Be terse."}, user("Explain DNS.")]}),
    # --- content as text parts -------------------------------------------------------------------
    ("user_text_parts", {"messages": [user(parts("Look at this:", "the second part"))]}),
    ("user_text_parts_with_empty", {"messages": [user(parts("", "a", "", "b"))]}),
    ("system_text_parts", {"messages": [system(parts("You are", "helpful.")), user("hi")]}),
    ("assistant_text_parts", {"messages": [user("q"), assistant(parts("x", "y")), user("z")]}),
    ("merged_users_with_parts", {"messages": [user("plain"), user(parts("p1", "p2")), user("")]}),
    # --- empty strings -------------------------------------------------------------------------
    ("empty_user", {"messages": [user("")]}),
    ("empty_user_with_system", {"messages": [system("sys"), user("")]}),
    ("empty_system_ignored", {"messages": [system(""), user("hi")]}),
    ("empty_system_among_others", {"messages": [system("first"), system(""), user("hi"), system([]), user("there")]}),
    ("empty_text_part_system", {"messages": [system(parts("")), system("real"), user("hi")]}),
    ("empty_earlier_user", {"messages": [user(""), assistant("ok"), user("now")]}),
    # --- whitespace ------------------------------------------------------------------------------
    ("leading_spaces", {"messages": [user("   three leading spaces")]}),
    ("trailing_spaces", {"messages": [user("trailing   ")]}),
    ("multiple_spaces", {"messages": [user("a  b   c    d\u00a0e")]}),
    ("only_spaces", {"messages": [user(" ")]}),
    ("only_newlines", {"messages": [user("\n\n\n")]}),
    ("tabs_and_crlf", {"messages": [user("col1\tcol2\r\nrow2\tx\r\n")]}),
    ("assistant_trailing_whitespace", {"messages": [user("q"), assistant("answer  \n  "), user("q2")]}),
    ("assistant_leading_spaces", {"messages": [user("q"), assistant("  indented"), user("q2")]}),
    ("system_with_edge_newlines", {"messages": [system("\nsys\n"), user("\nuser\n")]}),
    ("code_block", {"messages": [user("```python\ndef f(x):\n    return x  # four spaces\n```\n")]}),
    # --- unicode ---------------------------------------------------------------------------------
    ("cjk", {"messages": [user("你好，世界！今天天气怎么样？日本語のテキスト。한국어 문장.")]}),
    ("emoji", {"messages": [user("👍🏽 👨‍👩‍👧‍👦 🇫🇷 🧬 ❤️ 1️⃣")]}),
    ("combining_marks", {"messages": [user("e\u0301 n\u0303 a\u030a\u0323 क्षि 한\u1100\u1161 Z\u0351\u0352\u0353")]}),
    ("rtl", {"messages": [user("שלום עולם \u200fمرحبا بالعالم\u200e end")]}),
    ("rare_scripts_byte_fallback", {"messages": [user("𓀀𓂀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001F9EC \u0fff \U000E0041")]}),
    ("zero_width_and_variation", {"messages": [user("a\u200bb\u200dc\ufe0fd\ufeff")]}),
    ("control_lookalike_text", {"messages": [user("[INST] not a token [/INST] </s> <s> [TOOL_CALLS] [AVAILABLE_TOOLS]")]}),
    ("digits", {"messages": [user("3.14159 26535 0x1F 1,000,000 -42e10")]}),
    # --- tools -----------------------------------------------------------------------------------
    ("tools_simple", {"messages": [user("Weather in Paris?")], "tools": [WEATHER]}),
    ("tools_nested_schema", {"messages": [system("You book flights."), user("CDG to JFK on 2025-01-02")], "tools": [SEARCH]}),
    ("tools_unicode_strict_dropped", {"messages": [user("2+2")], "tools": [CALC]}),
    ("tools_bare", {"messages": [user("ping it")], "tools": [BARE]}),
    ("tools_several_multi_turn", {"messages": [
        user("hi"), assistant("hello"), user("weather and flights please"),
    ], "tools": [WEATHER, SEARCH, CALC, BARE]}),
    ("tools_empty_list", {"messages": [user("no tools")], "tools": []}),
    # --- tool calls and results ------------------------------------------------------------------
    ("call_then_result_last", {"messages": [
        user("Weather in Paris?"),
        calls(("abcDEF123", "get_weather", '{"city": "Paris"}')),
        result("abcDEF123", '{"temperature": 21, "unit": "celsius"}'),
    ], "tools": [WEATHER]}),
    ("call_result_answer_user", {"messages": [
        system("Be brief."),
        user("Weather in Paris?"),
        calls(("abcDEF123", "get_weather", '{"city": "Paris"}')),
        result("abcDEF123", '{"temperature": 21}'),
        assistant("It is 21 °C in Paris."),
        user("Thanks! And Tokyo?"),
    ], "tools": [WEATHER]}),
    ("parallel_calls", {"messages": [
        user("Weather in Paris and Tokyo?"),
        calls(("call00001", "get_weather", '{"city": "Paris"}'), ("call00002", "get_weather", '{"city": "東京"}')),
        result("call00001", '{"t": 21}'),
        result("call00002", '{"t": 30}'),
    ], "tools": [WEATHER]}),
    ("result_plain_text", {"messages": [
        user("go"), calls(("A1b2C3d4E", "ping", "{}")), result("A1b2C3d4E", "pong: all good"),
    ], "tools": [BARE]}),
    ("result_json_scalars", {"messages": [
        user("go"),
        calls(("id0000001", "ping", "{}"), ("id0000002", "ping", "{}"), ("id0000003", "ping", "{}"), ("id0000004", "ping", "{}")),
        result("id0000001", "42"),
        result("id0000002", '"a json string"'),
        result("id0000003", "[1, 2, {\"x\": null}]"),
        result("id0000004", "true"),
    ], "tools": [BARE]}),
    ("result_empty", {"messages": [user("go"), calls(("emptyRes1", "ping", "{}")), result("emptyRes1", "")], "tools": [BARE]}),
    ("result_text_parts", {"messages": [
        user("go"), calls(("partsRes1", "ping", "{}")), result("partsRes1", parts('{"a":', " 1}")),
    ], "tools": [BARE]}),
    ("result_unicode_and_spacing", {"messages": [
        user("go"), calls(("uniRes001", "ping", "{}")), result("uniRes001", '{ "msg" :"héllo 世界 🌍",  "n":1.50 }'),
    ], "tools": [BARE]}),
    ("arguments_as_dict", {"messages": [
        user("go"),
        {"role": "assistant", "tool_calls": [{"id": "dictArgs1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]},
        result("dictArgs1", "{}"),
    ], "tools": [WEATHER]}),
    ("arguments_empty", {"messages": [user("go"), calls(("emptyArg1", "ping", "")), result("emptyArg1", "ok")], "tools": [BARE]}),
    ("arguments_not_json", {"messages": [
        user("go"), calls(("badJson01", "calculator", "2+2 {not json")), result("badJson01", "4"),
    ], "tools": [CALC]}),
    ("arguments_nested_unicode", {"messages": [
        user("book"),
        calls(("nested001", "search_flights",
               '{"legs":[{"from":"CDG","to":"NRT","date":"2025-03-01"}],"passengers":{"adults":2},"note":"café ✈ 成田"}')),
        result("nested001", '[{"price": 812.5, "currency": "EUR"}]'),
        user("Book the cheapest."),
    ], "tools": [SEARCH]}),
    ("call_content_empty_string", {"messages": [
        user("go"), calls(("emptyCon1", "ping", "{}"), content=""), result("emptyCon1", "pong"),
    ], "tools": [BARE]}),
    ("tool_name_field_ignored", {"messages": [
        user("go"), calls(("named0001", "ping", "{}")), result("named0001", "pong", name="ping"),
    ], "tools": [BARE]}),
    ("two_tool_rounds", {"messages": [
        system("Use tools."),
        user("Paris weather, then convert."),
        calls(("round0001", "get_weather", '{"city":"Paris"}')),
        result("round0001", '{"t": 21}'),
        calls(("round0002", "calculator", '{"expr":"21*9/5+32"}')),
        result("round0002", "69.8"),
        assistant("69.8 °F"),
        user("thanks"),
    ], "tools": [WEATHER, CALC]}),
    ("tool_history_without_tools_now", {"messages": [
        user("go"), calls(("histNo001", "ping", "{}")), result("histNo001", "pong"), assistant("done"), user("again?"),
    ]}),
    # --- continuing an assistant prefix ----------------------------------------------------------
    ("continue_prefix", {"messages": [user("Write a haiku."), assistant("Autumn moonlight —")], "continue_final_message": True}),
    ("continue_prefix_trailing_space", {"messages": [
        system("poet"), user("Start a story."), assistant("Once upon a time "),
    ], "continue_final_message": True}),
    ("continue_after_tools", {"messages": [
        user("go"), calls(("contTool1", "ping", "{}")), result("contTool1", "pong"), assistant("The tool said"),
    ], "tools": [BARE], "continue_final_message": True}),
]

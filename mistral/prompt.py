"""The v3 instruct format: an OpenAI chat request in, the exact prompt ids out; model output back.

The prompt Mistral-7B-Instruct-v0.3 was trained on reads (spaces shown only between tokens):

    <s> [INST] user [/INST] answer </s> ... [INST] user [/INST] [TOOL_CALLS] calls </s>
        [TOOL_RESULTS] result [/TOOL_RESULTS] ... [AVAILABLE_TOOLS] tools [/AVAILABLE_TOOLS]
        [INST] system\n\nlast user [/INST] (then any calls, results or answer prefix after it)

with these rules, each taken from what mistral-common builds (and tested against it token for token):

- Consecutive messages of one role are merged: their text parts, empty ones dropped, joined by a
  blank line. Tool messages are never merged. A system message between two user messages still
  separates them.
- All system messages together, joined by blank lines, go in front of the *last* user message;
  they are not a turn of their own. The tool definitions go just before that same [INST].
- The conversation starts with a user turn: if it doesn't, an empty one ([INST][/INST]) is put first.
- Assistant text loses its trailing spaces (only spaces) and ends with </s>, unless it is the
  prefix the model is asked to continue. Tool calls are `[TOOL_CALLS]` + a JSON list of
  {"name", "arguments", "id"}, arguments as a JSON value when they parse, else as the string.
  Ids of another shape than v3's 9 characters are mapped to 9 by a hash (`v3_tool_call_id`).
- Beyond mistral-common (which refuses it), an assistant message with both text and tool calls
  is written as the model writes such an answer: the text, then `[TOOL_CALLS]` and the calls.
- Tool results are `{"content": ..., "call_id": ...}`, content as a JSON value when it parses,
  `{}` when empty, else the string. Calls and results of earlier turns stay in the prompt (v2
  dropped those before the last user message; v3 does not).
- JSON is written by `json.dumps(..., ensure_ascii=False)` with its default separators; each piece
  of text is encoded on its own (so each starts with SentencePiece's dummy-prefix space).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import RequestError
from .tokenizer import Tokenizer

TOOL_CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits

ROLES = ("system", "user", "assistant", "tool")
# Which role may follow which (the same table mistral-common validates with).
_MAY_FOLLOW = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"user", "assistant", "tool"},
    "tool": {"user", "assistant", "tool"},
}
_MEDIA_PARTS = {"image_url": "image", "image": "image", "input_audio": "audio", "audio_url": "audio", "file": "file"}

SEP = "\n\n"  # between merged messages, between text parts, between system prompt and user text


# --- the request, read and checked ---------------------------------------------------------------


@dataclass
class _Message:
    """One request message, checked: its text (parts joined) and, by role, calls or the call it answers."""

    index: int
    role: str
    parts: list[str]  # the text parts, as given (may hold empty strings)
    has_content: bool = False  # the content was non-empty as given (a system message counts only then)
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments", "id"} as they will be written
    call_id: str | None = None

    @property
    def text(self) -> str:
        return SEP.join(p for p in self.parts if p)


@dataclass
class _Turn:
    """A turn of the prompt: consecutive messages of one role merged."""

    role: str
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    call_id: str | None = None
    prefix: bool = False


def _text_parts(content: Any, where: str, allow_none: bool = False) -> list[str] | None:
    """A message's content, a string or a list of text parts, as a list of strings."""
    if content is None:
        if allow_none:
            return None
        raise RequestError(f"{where}: content is required", param=where)
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        kind = type(content).__name__
        raise RequestError(f"{where}: content must be a string or a list of parts, got {kind}", param=where)
    parts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"{here}: a content part must be an object, got {type(part).__name__}", param=here)
        kind = part.get("type")
        if kind in _MEDIA_PARTS:
            raise RequestError(
                f"{here}: {_MEDIA_PARTS[kind]} input ({kind!r} part) is not supported: "
                "Mistral-7B-Instruct-v0.3 reads text only",
                param=f"{here}.type",
            )
        if kind != "text":
            raise RequestError(f"{here}: unknown content part type {kind!r} (expected 'text')", param=f"{here}.type")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{here}: a text part needs a string 'text'", param=f"{here}.text")
        parts.append(part["text"])
    return parts


def _arguments(raw: Any, where: str) -> Any:
    """Tool-call arguments as written into the prompt: the JSON value if they parse, else the string."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    if not isinstance(raw, str):
        raise RequestError(f"{where}: arguments must be a JSON string, got {type(raw).__name__}", param=where)
    return _json_or_text(raw)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _read_tool_calls(calls: Any, where: str) -> list[dict]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RequestError(f"{where}: tool_calls must be a list", param=where)
    out, seen = [], set()
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RequestError(f"{here}: a tool call must be an object", param=here)
        call_id = v3_tool_call_id(call.get("id"), f"{here}.id")
        if call_id in seen:
            raise RequestError(f"{here}.id: tool call id {call_id!r} is used twice in this message", param=f"{here}.id")
        seen.add(call_id)
        if call.get("type", "function") != "function":
            raise RequestError(
                f"{here}.type: only 'function' tool calls exist, got {call.get('type')!r}", param=f"{here}.type"
            )
        function = call.get("function")
        if not isinstance(function, dict):
            raise RequestError(
                f"{here}.function: an object with 'name' and 'arguments' is required", param=f"{here}.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise RequestError(
                f"{here}.function.name: a function name is 1 to 64 characters from [A-Za-z0-9_-], got {name!r}",
                param=f"{here}.function.name",
            )
        arguments = _arguments(function.get("arguments"), f"{here}.function.arguments")
        out.append({"name": name, "arguments": arguments, "id": call_id})
    return out


def _read_messages(messages: Any, continue_final_message: bool) -> list[_Message]:
    """Check every message and the conversation's shape; errors name the message index.

    Where mistral-common lets through a prompt the model could not use well, this is stricter:
    every tool call must get its result before the conversation moves on (OpenAI's rule too), and
    the last message must be a user or tool message, never a system one.
    """
    if not isinstance(messages, list):
        raise RequestError(f"messages must be a list, got {type(messages).__name__}", param="messages")
    if not messages:
        raise RequestError("messages: the conversation is empty", param="messages")

    read: list[_Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: a message must be an object, got {type(m).__name__}", param=where)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise RequestError(
                f"{where}.role: unknown role {role!r} (expected system, user, assistant or tool)", param=f"{where}.role"
            )
        content = m.get("content")
        if role == "assistant":
            parts = _text_parts(content, f"{where}.content", allow_none=True) or []
            msg = _Message(i, role, parts, tool_calls=_read_tool_calls(m.get("tool_calls"), f"{where}.tool_calls"))
            if not msg.text and not msg.tool_calls:
                raise RequestError(f"{where}: an assistant message needs non-empty content or tool_calls", param=where)
        else:
            msg = _Message(i, role, _text_parts(content, f"{where}.content"), has_content=bool(content))
        if role == "tool":
            msg.call_id = v3_tool_call_id(m.get("tool_call_id"), f"{where}.tool_call_id")
        read.append(msg)

    for prev, msg in zip(read, read[1:]):
        if msg.role not in _MAY_FOLLOW[prev.role]:
            raise RequestError(
                f"messages[{msg.index}].role: a {msg.role} message cannot follow a {prev.role} message",
                param=f"messages[{msg.index}].role",
            )

    last = read[-1]
    if continue_final_message:
        if last.role != "assistant":
            raise RequestError(
                f"messages[{last.index}]: continue_final_message needs an assistant message last, not {last.role}",
                param=f"messages[{last.index}].role",
            )
        if last.tool_calls:
            raise RequestError(
                f"messages[{last.index}]: continue_final_message continues text, not tool calls",
                param=f"messages[{last.index}].tool_calls",
            )
    elif last.role not in ("user", "tool"):
        raise RequestError(
            f"messages[{last.index}].role: the last message must be a user or tool message, not {last.role} "
            "(to continue an assistant message, ask for continue_final_message)",
            param=f"messages[{last.index}].role",
        )

    # Every tool call is answered, once, by the tool messages right after it; nothing else is.
    open_calls: dict[str, bool] = {}  # id -> answered, for the latest assistant message with calls
    caller = -1
    for msg in [*read, None]:
        if msg is not None and msg.role == "tool":
            where = f"messages[{msg.index}].tool_call_id"
            if msg.call_id not in open_calls:
                raise RequestError(
                    f"{where}: no tool call with id {msg.call_id!r} precedes this tool message", param=where
                )
            if open_calls[msg.call_id]:
                raise RequestError(f"{where}: tool call {msg.call_id!r} is already answered", param=where)
            open_calls[msg.call_id] = True
            continue
        if msg is not None and msg.role == "system":
            continue
        unanswered = [k for k, done in open_calls.items() if not done]
        if unanswered:
            raise RequestError(
                f"messages[{caller}].tool_calls: no tool message answers the call(s) {', '.join(unanswered)}",
                param=f"messages[{caller}].tool_calls",
            )
        if msg is not None and msg.role == "assistant":
            open_calls = {c["id"]: False for c in msg.tool_calls}
            caller = msg.index
    return read


def _turns(read: list[_Message], continue_final_message: bool) -> list[_Turn]:
    """Merge consecutive messages of one role into turns; system messages only separate them."""
    turns: list[_Turn] = []
    prev_role = None
    for msg in read:
        if msg.role == "system":
            prev_role = "system"
            continue
        merge = msg.role == prev_role and msg.role != "tool"
        prev_role = msg.role
        if not merge:
            turns.append(_Turn(msg.role, call_id=msg.call_id))
            if msg.role == "tool":
                turns[-1].text = msg.text
                continue
        turn = turns[-1]
        if msg.text:
            turn.text = turn.text + SEP + msg.text if turn.text else msg.text
        turn.tool_calls += msg.tool_calls
    if continue_final_message:
        turns[-1].prefix = True
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user"))
    return turns


def _system_prompt(read: list[_Message]) -> str:
    return SEP.join(m.text for m in read if m.role == "system" and m.has_content)


def read_tools(tools: Any) -> list[dict]:
    """Check an OpenAI `tools` list; return the tools as the prompt writes them.

    That is {"type": "function", "function": {"name", "description", "parameters"}} in this order,
    with description "" and parameters {} when absent, and nothing else ("strict" is dropped).
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list, got {type(tools).__name__}", param="tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where}: a tool must be an object", param=where)
        if tool.get("type", "function") != "function":
            raise RequestError(
                f"{where}.type: only 'function' tools exist, got {tool.get('type')!r}", param=f"{where}.type"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function: an object with a 'name' is required", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise RequestError(
                f"{where}.function.name: a function name is 1 to 64 characters from [A-Za-z0-9_-], got {name!r}",
                param=f"{where}.function.name",
            )
        if name in names:
            raise RequestError(f"{where}.function.name: two tools are named {name!r}", param=f"{where}.function.name")
        names.add(name)
        description = function.get("description")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise RequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise RequestError(
                f"{where}.function.parameters must be a JSON schema object, got {type(parameters).__name__}",
                param=f"{where}.function.parameters",
            )
        function = {"name": name, "description": description, "parameters": parameters}
        out.append({"type": "function", "function": function})
    return out


# --- encoding ------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    continue_final_message: bool = False,
) -> list[int]:
    """The prompt ids of an OpenAI chat request, byte for byte what mistral-common's v3 tokenizer builds.

    With `continue_final_message`, the last message must be an assistant message: its text is left
    open (no </s>) for the model to continue. Raises RequestError naming the offending field.
    """
    tool_defs = read_tools(tools)
    read = _read_messages(messages, continue_final_message)
    turns = _turns(read, continue_final_message)
    system = _system_prompt(read)
    last_user = max(k for k, t in enumerate(turns) if t.role == "user")

    tok = tokenizer
    ids = [tok.bos_id]
    for k, turn in enumerate(turns):
        if turn.role == "user":
            text = turn.text
            if k == last_user:
                if tool_defs:
                    ids += [tok.available_tools_id, *tok.encode(_dumps(tool_defs)), tok.available_tools_end_id]
                if system:
                    text = system + SEP + text
            ids += [tok.inst_id, *tok.encode(text), tok.inst_end_id]
        elif turn.role == "assistant":
            if turn.text:
                ids += tok.encode(turn.text.rstrip(" "))
            if turn.tool_calls:  # after any text, as the model writes them (parse_tool_calls reads it so)
                ids += [tok.tool_calls_id, *tok.encode(_dumps(turn.tool_calls))]
            if not turn.prefix:
                ids.append(tok.eos_id)
        else:  # tool
            content = _json_or_text(turn.text) if turn.text else {}
            result = _dumps({"content": content, "call_id": turn.call_id})
            ids += [tok.tool_results_id, *tok.encode(result), tok.tool_results_end_id]
    return ids


def encode_request(tokenizer: Tokenizer, body: Any) -> list[int]:
    """The prompt ids of an OpenAI chat-completions request body (messages, tools, continue_final_message)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    if "messages" not in body:
        raise RequestError("the request has no 'messages'", param="messages")
    cont = body.get("continue_final_message", False)
    if not isinstance(cont, bool):
        raise RequestError("continue_final_message must be true or false", param="continue_final_message")
    return encode_chat(tokenizer, body["messages"], body.get("tools"), continue_final_message=cont)


# --- tool_choice ---------------------------------------------------------------------------------


class ToolChoice(NamedTuple):
    """What the model may do about tools: mode "none", "auto", "required" or "function" (with `name`)."""

    mode: str
    name: str | None = None


def read_tool_choice(tool_choice: Any, tools: list[dict] | None) -> ToolChoice:
    """Check OpenAI's `tool_choice` against `tools`. Absent means "auto" with tools, "none" without."""
    names = [t["function"]["name"] for t in read_tools(tools)]
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")
    if tool_choice == "any":  # Mistral's API name for "required"
        tool_choice = "required"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not names:
            raise RequestError("tool_choice 'required' needs at least one tool in 'tools'", param="tool_choice")
        return ToolChoice(tool_choice)
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise RequestError("tool_choice.function.name must be a string", param="tool_choice")
        if name not in names:
            raise RequestError(f"tool_choice names the function {name!r}, which is not in 'tools'", param="tool_choice")
        return ToolChoice("function", name)
    raise RequestError(
        f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
        f"got {tool_choice!r}",
        param="tool_choice",
    )


# --- model output --------------------------------------------------------------------------------


def v3_tool_call_id(call_id: Any, where: str) -> str:
    """A tool-call id as the v3 format writes it: 9 characters from [A-Za-z0-9]. Ids of other
    shapes (OpenAI's `call_abc123...`, other providers') are mapped to 9 such characters by a hash,
    so a call and the tool message that answers it still carry the same id in the prompt."""
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"{where}: a tool call id must be a non-empty string, got {call_id!r}", param=where)
    if TOOL_CALL_ID.fullmatch(call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(_ID_ALPHABET[(digest // 62**k) % 62] for k in range(9))


def new_tool_call_id() -> str:
    """A fresh tool-call id: 9 characters from [A-Za-z0-9], as the v3 format requires."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def parse_tool_calls(tokenizer: Tokenizer, token_ids: list[int]) -> tuple[str | None, list[dict] | None]:
    """Split generated ids into (content, tool_calls in OpenAI's shape).

    The [TOOL_CALLS] token is found by its id (text that merely reads "[TOOL_CALLS]" is content).
    Text before it is the content (None if blank); after it comes a JSON list of
    {"name", "arguments"} objects. Output that does not parse as calls comes back whole as
    content, with tool_calls None: a model's mistake is the client's to see, not a crash.
    """
    ids = list(token_ids)
    marks = [k for k, t in enumerate(ids) if t == tokenizer.tool_calls_id]
    if not marks:
        return tokenizer.decode(ids), None
    content = tokenizer.decode(ids[: marks[0]])
    calls: list[dict] = []
    for start, end in zip(marks, [*marks[1:], len(ids)]):
        parsed = _parse_calls(tokenizer.decode(ids[start + 1 : end]))
        if parsed is None:
            return tokenizer.decode(ids), None
        calls += parsed
    if not calls:
        return tokenizer.decode(ids), None
    return (content if content.strip() else None), calls


def _parse_calls(text: str) -> list[dict] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):  # one call written without its list
        value = [value]
    if not isinstance(value, list):
        return None
    calls = []
    for call in value:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return None
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({
            "id": new_tool_call_id(),
            "type": "function",
            "function": {"name": call["name"], "arguments": arguments},
        })
    return calls


_CALL_HEAD = re.compile(r'\s*\}?\s*[\[,]?\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


class ToolCallStream:
    """The calls after [TOOL_CALLS], in OpenAI's streamed shape while they are written: for each call a
    delta with its index, a new id, type and name once the name is complete, then its arguments'
    JSON text in fragments as it arrives.

    It follows the shape the model writes, `[{"name": "f", "arguments": {...}}, ...]` (a grammar
    makes it so under tool_choice); `calls` is what it has seen. Output of another shape streams
    nothing here: `parse_tool_calls` reads the whole output at the end instead.
    """

    def __init__(self):
        self.calls: list[dict] = []
        self._text = ""
        self._at = 0  # where scanning resumes in _text
        self._args_from: int | None = None  # start of the current call's arguments, while inside them
        self._depth, self._in_string, self._escape = 0, False, False

    def push(self, text: str) -> list[dict]:
        """Feed decoded text; returns the tool_call deltas it completes."""
        self._text += text
        deltas = []
        while True:
            if self._args_from is None:
                head = _CALL_HEAD.match(self._text, self._at)
                if head is None or head.end() == len(self._text):  # wait for the first character of the arguments
                    return deltas
                call_id, name = new_tool_call_id(), head.group(1)
                self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
                deltas.append({"index": len(self.calls) - 1, "id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
                self._at = self._args_from = head.end()
            end = self._scan_arguments()
            fragment = self._text[self._args_from:end if end is not None else self._at]
            if fragment:
                self.calls[-1]["function"]["arguments"] += fragment
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
            if end is None:
                self._args_from = self._at
                return deltas
            self._args_from, self._at = None, end  # the call's closing brace goes with the next call's head

    def _scan_arguments(self) -> int | None:
        """Move through the arguments' JSON value; its end (exclusive) once seen, else None."""
        text = self._text
        while self._at < len(text):
            ch = text[self._at]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]" or (ch == "," and self._depth == 0):
                if self._depth == 0:  # a scalar value ended at the call's own brace or comma
                    return self._at
                self._depth -= 1
                if self._depth == 0:
                    self._at += 1
                    return self._at
            self._at += 1
        return None

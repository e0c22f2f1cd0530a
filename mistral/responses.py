"""The OpenAI objects an answer is made of: `chat.completion(.chunk)` and `text_completion` dicts,
their usage and logprobs, and the compact JSON a server frames them in.

Plain functions of plain data: which chunk to send when is job.py's business, not this file's.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .tokenizer import Tokenizer


def envelope(job_id: str, kind: str, stream: bool, created: int, model: str, system_fingerprint: str) -> dict:
    """The fields every chunk (or the completion) of one request shares; copied into each.
    kind: "chat" or "text"."""
    if kind == "chat":
        obj = "chat.completion.chunk" if stream else "chat.completion"
    else:
        obj = "text_completion"  # streamed or not, as OpenAI names it
    return {"id": job_id, "object": obj, "created": created, "model": model, "system_fingerprint": system_fingerprint}


def chunk(envelope: dict, kind: str, index: int, delta: dict | str, logprobs: list[dict],
          finish_reason: str | None = None) -> dict:
    """One streamed piece of choice `index`: a chat delta ({"role"/"content"/"tool_calls": ...}) or,
    for a text completion, its text; `logprobs` the entries of the tokens it carries."""
    if kind == "chat":
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": delta if isinstance(delta, str) else "",
                  "logprobs": text_logprobs(logprobs) if logprobs else None, "finish_reason": finish_reason}
    return {**envelope, "choices": [choice]}


def completion_choice(kind: str, index: int, content: str, tool_calls: list[dict] | None,
                      logprobs: list[dict] | None, finish_reason: str | None) -> dict:
    """One choice of a whole (non-streamed) answer; logprobs None when they were not asked for."""
    if kind == "chat":
        # content is null when the answer is only tool calls, as OpenAI sends it
        message: dict[str, Any] = {"role": "assistant", "content": content if (content or not tool_calls) else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": finish_reason}
    return {"index": index, "text": content, "logprobs": text_logprobs(logprobs) if logprobs is not None else None,
            "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}, "completion_tokens_details": None}


def logprob_entry(tokenizer: Tokenizer, token: int, logprob: float, top_logprobs) -> dict:
    """A chat logprobs entry: the token's text, bytes and logprob, and its `top_logprobs` alternatives
    ((token, logprob) pairs)."""
    text, raw = _token_text(tokenizer, token)
    top = []
    for alt, alt_logprob in top_logprobs or ():
        t, b = _token_text(tokenizer, alt)
        top.append({"token": t, "logprob": _finite(alt_logprob), "bytes": b})
    return {"token": text, "logprob": _finite(logprob), "bytes": raw, "top_logprobs": top}


def text_logprobs(entries: list[dict]) -> dict:
    """Chat logprobs entries in the legacy completions layout (parallel lists)."""
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": None}


def dumps(obj: dict) -> str:
    """Compact JSON for a chunk (what the server frames as an SSE event). U+0085, U+2028 and U+2029,
    which JSON may leave raw, are escaped: line readers built on str.splitlines (httpx's among them)
    break an event at them, though SSE ends lines only at CR and LF."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text as logprobs show it, and its UTF-8 bytes (none for a control token)."""
    if tokenizer.is_byte(token):
        b = tokenizer.byte_value[token]
        return bytes([b]).decode("utf-8", errors="backslashreplace"), [b]
    if tokenizer.is_control(token):
        return tokenizer.id_to_piece(token), []
    text = tokenizer.id_to_piece(token).replace("\u2581", " ")
    return text, list(text.encode())


def _finite(logprob: float) -> float:
    """JSON has no -inf (a token the model rules out, a forced one included) nor NaN: such logprobs
    go out as -9999.0, as vLLM writes them, so that every answer stays valid JSON."""
    return logprob if math.isfinite(logprob) else -9999.0

"""One request's run: its engine sequences (n per prompt), each choice's decoding state, and the
chunks the engine's events become.

A `Job` is driven from outside, by whoever waits for the events (generate.py, on the caller's thread
or in an event loop):

    job.submit(emit)                    # the engine calls emit(choice index, event) for each event
    chunks = [*job.opening()]           # the streamed role deltas
    while not job.done:
        chunks += job.on_event(*next_event())   # a token or a finish; the closing chunks after the last
    job.cancel_unfinished()             # in a `finally`: a consumer gone drops its sequences

Each choice holds a streaming detokenizer (which stops at a stop string), the ids after
[TOOL_CALLS] (parsed into calls at the end, or streamed as calls while they are written), its token
count and logprobs. The OpenAI shapes themselves are responses.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from typing import Callable, Iterator

from . import responses
from .engine import Engine, FinishEvent, QueueFull, TokenEvent
from .errors import RequestError
from .prepare import Prepared
from .prompt import ToolCallStream, parse_tool_calls
from .protocol import GenerationRequest
from .tokenizer import StreamingDetokenizer, Tokenizer

Emit = Callable[[int, "TokenEvent | FinishEvent"], None]  # (choice index, event), called on the engine's thread


class Choice:
    """One choice's decoding state: detokenizer, tool-call capture, counts, logprobs."""

    def __init__(self, index: int, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.index = index
        self.detok = StreamingDetokenizer(tokenizer, stop)
        self.tokens = 0  # generated tokens counted in usage
        self.content = ""
        self.tool_ids: list[int] | None = None  # ids after [TOOL_CALLS], once it appears
        self.tool_calls: list[dict] | None = None
        self.call_stream: ToolCallStream | None = None  # streamed answers: the calls as they are written
        self.call_text: StreamingDetokenizer | None = None  # the text after [TOOL_CALLS], for call_stream
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []  # all entries, for the non-streamed answer
        self.pending_logprobs: list[dict] = []  # entries not yet attached to a chunk
        self.stopped_early = False  # a stop string matched: the engine should drop the sequence


class Job:
    """One request: n engine sequences per prompt, and the chunks made from their events."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, kind: str, prepared: Prepared, req: GenerationRequest,
                 *, model: str, system_fingerprint: str):
        self.engine, self.tokenizer, self.kind = engine, tokenizer, kind  # kind: "chat" or "text"
        self.prompts, self.gen, self.tools_enabled = prepared.prompts, prepared.gen, prepared.tools_enabled
        self.n, self.stream, self.include_usage = req.n, req.stream, req.include_usage
        self.model, self.system_fingerprint = model, system_fingerprint
        self.id = ("chat-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        # choice p * n + i: sample i of prompt p
        self.choices = [Choice(i, tokenizer, req.stop) for i in range(len(self.prompts) * self.n)]
        self.seqs: list = []  # the engine's sequences, once submitted

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def submit(self, emit: Emit) -> None:
        """Queue every choice's sequence in the engine; all or none (a full queue is a RequestError)."""
        seqs = []
        try:
            for k in range(len(self.choices)):
                prompt, i = self.prompts[k // self.n], k % self.n
                gen = self.gen if self.gen.seed is None else dataclasses.replace(self.gen, seed=self.gen.seed + i)
                seqs.append(self.engine.add(prompt, gen, lambda ev, k=k: emit(k, ev)))
        except QueueFull as e:
            for seq in seqs:
                self.engine.cancel(seq)
            raise RequestError(f"the server is busy: {e}", code="queue_full") from None
        self.seqs = seqs

    def cancel_unfinished(self) -> None:
        for seq, choice in zip(self.seqs, self.choices):
            if choice.finish_reason is None or choice.stopped_early:
                self.engine.cancel(seq)

    # --- events -> chunks ------------------------------------------------------------------------------

    def opening(self) -> Iterator[dict]:
        if self.stream and self.kind == "chat":
            for c in self.choices:
                yield self._chunk(c, {"role": "assistant", "content": ""})

    def on_event(self, i: int, ev: TokenEvent | FinishEvent) -> Iterator[dict]:
        """The chunks of choice i's event; once the last choice has finished, the closing ones (the usage
        chunk, or the whole completion when not streamed)."""
        yield from self._choice_event(self.choices[i], ev)
        if self.choices[i].stopped_early:
            self.engine.cancel(self.seqs[i])
        if self.done:
            yield from self._closing()

    def _choice_event(self, c: Choice, ev: TokenEvent | FinishEvent) -> Iterator[dict]:
        if c.finish_reason is not None:
            return  # events after a stop string matched
        tok = self.tokenizer
        if isinstance(ev, TokenEvent):
            c.tokens += 1
            if self.gen.logprobs:
                entry = responses.logprob_entry(tok, ev.token, ev.logprob, ev.top_logprobs)
                c.logprobs.append(entry)
                c.pending_logprobs.append(entry)
            if c.tool_ids is not None:
                c.tool_ids.append(ev.token)
                if c.call_stream is not None:
                    deltas = c.call_stream.push(c.call_text.push(ev.token))
                    if deltas:
                        yield self._chunk(c, {"tool_calls": deltas})
                return
            if self.tools_enabled and ev.token == tok.tool_calls_id:
                c.tool_ids = [ev.token]
                if self.stream and self.kind == "chat":
                    c.call_stream, c.call_text = ToolCallStream(), StreamingDetokenizer(tok)
                yield from self._content(c, c.detok.finish())  # text held back before the call is content
                return
            text = c.detok.push(ev.token)
            if c.detok.stopped:
                c.stopped_early = True
                c.finish_reason = "stop"
            yield from self._content(c, text)
            if c.finish_reason is not None and self.stream:
                yield self._chunk(c, {}, finish_reason=c.finish_reason)
            return
        assert isinstance(ev, FinishEvent)
        if ev.reason == "error":
            raise RuntimeError(f"generation failed: {ev.message}")
        reason = "length" if ev.reason == "length" else "stop"
        if c.call_stream is not None and c.call_stream.calls:  # streamed as they came
            c.tool_calls = c.call_stream.calls
            reason = "tool_calls" if reason == "stop" else reason
        elif c.tool_ids is not None:
            content, calls = parse_tool_calls(tok, c.tool_ids)
            if calls:
                c.tool_calls = calls
                reason = "tool_calls"
                if self.stream:
                    deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                    yield self._chunk(c, {"tool_calls": deltas})
            elif content:
                yield from self._content(c, content)
        else:
            yield from self._content(c, c.detok.finish())
        c.finish_reason = reason
        if self.stream:
            yield self._chunk(c, {}, finish_reason=reason)

    def _content(self, c: Choice, text: str) -> Iterator[dict]:
        if not text:
            return
        c.content += text
        if self.stream:
            yield self._chunk(c, {"content": text} if self.kind == "chat" else text)

    def _closing(self) -> Iterator[dict]:
        if not self.stream:
            yield self._completion()
        elif self.include_usage:
            yield {**self._envelope, "choices": [], "usage": self._usage()}

    # --- into responses.py's shapes ----------------------------------------------------------------------

    @functools.cached_property
    def _envelope(self) -> dict:
        return responses.envelope(self.id, self.kind, self.stream, self.created, self.model, self.system_fingerprint)

    def _chunk(self, c: Choice, delta: dict | str, finish_reason: str | None = None) -> dict:
        logprobs, c.pending_logprobs = c.pending_logprobs, []
        return responses.chunk(self._envelope, self.kind, c.index, delta, logprobs, finish_reason)

    def _completion(self) -> dict:
        choices = [responses.completion_choice(self.kind, c.index, c.content, c.tool_calls,
                                               c.logprobs if self.gen.logprobs else None, c.finish_reason)
                   for c in self.choices]
        return {**self._envelope, "choices": choices, "usage": self._usage()}

    def _usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompts)  # each prompt counted once, whatever n is
        cached = sum(seq.cached for seq in self.seqs[:: self.n])  # as its first sample found it in the prefix cache
        return responses.usage(prompt, sum(c.tokens for c in self.choices), cached)

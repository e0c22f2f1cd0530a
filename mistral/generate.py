"""`Mistral`: chat and text completions that return what an OpenAI-compatible provider returns.

    llm = Mistral.from_pretrained("weights/Mistral-7B-Instruct-v0.3")   # a GPU in bf16 if there is one, else the CPU
    for chunk in llm.create_chat_completion(messages=[...], max_tokens=512, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

The data flows one way: request -> prompt ids (prompt.py) -> engine (engine.py: prefill, decode,
sampling) -> token events -> detokenizer (tokenizer.py) -> `chat.completion(.chunk)` dicts. Every
object is plain JSON-serialisable data in OpenAI's shape.

Two ways to drive the engine: with no engine thread running, iterating a completion runs engine
steps on the caller's thread; after `start()` (what the server does) a background thread runs the
engine and any number of callers, sync or async, wait for their own events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import torch

from .engine import Engine, FinishEvent, GenerationParams, QueueFull, TokenEvent
from .errors import RequestError
from . import structured
from .protocol import MAX_N, ChatCompletionRequest, CompletionRequest, GenerationRequest
from .prompt import ToolCallStream, encode_chat, parse_tool_calls, read_tool_choice, read_tools
from .tokenizer import StreamingDetokenizer, Tokenizer



class Mistral:
    """A loaded model with its tokenizer and generation engine."""

    def __init__(self, model, tokenizer: Tokenizer, *, model_name: str = "mistral", max_batch: int = 8,
                 max_seq_len: int = 8192, fixed_batch_shape: bool = False, max_waiting: int = 256,
                 cuda_graphs: bool | None = None, compile: bool = False, kv_cache_gb: float | None = None,
                 prefix_caching: bool = True, prefill_chunk: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        if tokenizer.vocab_size != model.args.vocab_size:
            raise RequestError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is {model.args.vocab_size}")
        self.engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, eos_id=tokenizer.eos_id,
                             fixed_batch_shape=fixed_batch_shape, max_waiting=max_waiting, cuda_graphs=cuda_graphs,
                             compile=compile, kv_cache_gb=kv_cache_gb, prefix_caching=prefix_caching,
                             prefill_chunk=prefill_chunk)
        weight = model.output.weight
        self.system_fingerprint = f"mistral-from-scratch-{model.ops.name}-{str(weight.dtype).removeprefix('torch.')}-{weight.device.type}"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def tokenize(self, prompt: str | None = None, *, messages: list[dict] | None = None, tools: list[dict] | None = None,
                 continue_final_message: bool = False, add_special_tokens: bool | None = None) -> list[int]:
        """The ids the model would read: of a text `prompt` (after <s> unless add_special_tokens is
        false), or of chat `messages` in the v3 chat format (which always starts with <s>)."""
        if (prompt is None) == (messages is None):
            raise RequestError("give either 'prompt' or 'messages'", param="prompt" if messages is None else "messages")
        if messages is not None:
            return encode_chat(self.tokenizer, messages, tools, continue_final_message=continue_final_message)
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}", param="prompt")
        return self.tokenizer.encode(prompt, bos=add_special_tokens is not False)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids; an id outside the vocabulary is a RequestError naming its index."""
        for i, t in enumerate(tokens):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.tokenizer.vocab_size:
                raise RequestError(f"tokens[{i}]: {t!r} is not a token id (0 to {self.tokenizer.vocab_size - 1})",
                                   param="tokens")
        return self.tokenizer.decode(list(tokens))

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        kernels: str = "auto",
        max_batch: int = 8,
        max_seq_len: int = 8192,
        model_name: str | None = None,
        format: str | None = None,
        fixed_batch_shape: bool = False,
        max_waiting: int = 256,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        kv_cache_gb: float | None = None,
        prefix_caching: bool = True,
        prefill_chunk: int | None = None,
        token: str | None = None,
        revision: str | None = None,
        quiet: bool = False,
        quantize: str | None = None,
    ) -> "Mistral":
        """Load a local weights folder, or download a Hub repo (one format only) and load it.

        device: default "cuda" when available, else "cpu". kernels: which code computes the model's
        operations: "torch" (PyTorch's own operators, no custom kernels), "triton" (the fused Triton
        kernels, for CUDA) or "auto" (triton on CUDA, else torch). dtype: default bfloat16 on CUDA, the
        checkpoint's own dtype on CPU. max_seq_len: the KV cache's length per row (v0.3 reaches
        32768; 8192 x 8 rows of cache take 8 GiB in bf16). cuda_graphs: replay each decode step
        from a CUDA graph; default on for CUDA with the Triton kernels. compile: run each decode step through
        torch.compile, the fast path on the CPU (2-3.5x; the first step compiles, ~10 s to a minute).
        kv_cache_gb: the KV cache's pool of blocks (default: max_batch x max_seq_len positions).
        prefix_caching: reuse the cached blocks of a prompt's prefix (see engine.py). prefill_chunk:
        read long prompts that many tokens per step, between the running rows' decode steps.
        token: default the HF_TOKEN variable. quantize: "int8", "int4" or "int4-128" quantizes the
        linear layers while loading, tensor by tensor (see quantize.py); dtype is then the activations'.
        """
        from .devices import resolve_device
        from .hub import resolve_weights
        from .loader import load_model

        folder = resolve_weights(path_or_repo_id, format=format, token=token, revision=revision)
        device = resolve_device(device)
        if dtype is None and device.type == "cuda":
            dtype = "bfloat16"
        model = load_model(folder, device=device, dtype=dtype, kernels=kernels, prefer=format,
                           max_seq_len=max(max_seq_len, 1), quiet=quiet, quantize=quantize)
        tokenizer = Tokenizer.from_path(folder)
        name = model_name or (str(path_or_repo_id) if not Path(path_or_repo_id).exists() else Path(folder).name)
        return cls(model, tokenizer, model_name=name, max_batch=max_batch, max_seq_len=max_seq_len,
                   fixed_batch_shape=fixed_batch_shape, max_waiting=max_waiting, cuda_graphs=cuda_graphs,
                   compile=compile, kv_cache_gb=kv_cache_gb, prefix_caching=prefix_caching, prefill_chunk=prefill_chunk)

    # --- the background engine thread (the server's mode) --------------------------------------------

    def start(self) -> None:
        """Run the engine on a background thread, so that many callers can generate at once."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.engine.serve_forever, args=(self._stop,), name="mistral-engine", daemon=True)
            self._thread.start()

    def warm_up(self, *settings: dict) -> None:
        """Generate a few tokens and throw them away, so that what a decode step prepares on first
        use (the compilations of `compile=True`, CUDA graph capture, first-call allocations) is done
        before the first real request: at every batch size that needs its own preparation (see
        `Engine.warm_up_batches`), for each of `settings`, the sampling parameters to prepare for
        (dicts of create_completion's keyword arguments: temperature, top_p, ...), since each set of
        sampling features is a step of its own. By default: greedy, and sampling at temperature 1
        (the API's default). Call it before `start()`."""
        if self._thread is not None:
            raise RuntimeError("warm_up() runs the engine on the calling thread: call it before start()")
        from .progress import progress

        prompt = self.tokenizer.encode("warm-up", bos=True)
        settings = settings or ({"temperature": 0.0}, {"temperature": 1.0})
        steps = [(setting, rows) for setting in settings for rows in self.engine.warm_up_batches()]
        for setting, rows in progress(steps, desc="warming up", unit="step"):
            gen = self._generation_params(CompletionRequest.parse({"prompt": prompt, **setting}), len(prompt), "prompt")
            params = dataclasses.replace(gen, max_tokens=2, ignore_eos=True)  # a prefill, then one decode step
            for _ in range(rows):
                self.engine.add(prompt, params, lambda event: None)
            self.engine.run_until_idle()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self.engine.wake()
            self._thread.join()
            self._thread = None

    # --- the OpenAI-shaped API ---------------------------------------------------------------------

    def create_chat_completion(self, messages: list[dict], *, stream: bool = False, **params) -> dict | Iterator[dict]:
        """A `chat.completion` dict, or with stream=True an iterator of `chat.completion.chunk` dicts.

        Parameters as OpenAI's: tools, tool_choice, max_tokens (or max_completion_tokens),
        temperature, top_p, presence_penalty, frequency_penalty, stop, seed, n, logprobs,
        top_logprobs, logit_bias, stream_options; and as vLLM's: top_k, min_p, repetition_penalty,
        ignore_eos, min_tokens, continue_final_message (the last message is an assistant message whose
        text the model continues; the answer holds only the continuation). response_format
        ({"type": "text" | "json_object" | "json_schema", ...}), tool_choice "required" or a named
        function, and parallel_tool_calls are enforced by constrained decoding (structured.py).
        The fields are protocol.py's ChatCompletionRequest; a bad value, or a keyword it doesn't
        declare, raises RequestError naming the parameter.
        """
        job = self._chat_job(ChatCompletionRequest.parse({"messages": messages, "stream": stream, **params}))
        return self._stream(job) if stream else _last(self._stream(job))

    def create_completion(self, prompt: str | list, *, stream: bool = False, **params) -> dict | Iterator[dict]:
        """A `text_completion` for plain text (BOS + the prompt; no chat format).

        As in OpenAI's API, `prompt` may also be a list of strings, a list of token ids (used as
        they are, no BOS added), or a list of such lists: each prompt gets `n` choices, numbered
        prompt by prompt (choice `p * n + i` is sample i of prompt p)."""
        job = self._text_job(CompletionRequest.parse({"prompt": prompt, "stream": stream, **params}))
        return self._stream(job) if stream else _last(self._stream(job))

    async def acreate_chat_completion(self, messages: list[dict], *, stream: bool = False, **params):
        """The async twin of create_chat_completion; needs `start()`. Validation errors raise at once.
        The prompt is built and tokenized on a worker thread: a long one does not hold up the event loop."""
        req = ChatCompletionRequest.parse({"messages": messages, "stream": stream, **params})
        job = await asyncio.to_thread(self._chat_job, req)
        return self._astream(job) if stream else await _alast(self._astream(job))

    async def acreate_completion(self, prompt: str | list, *, stream: bool = False, **params):
        req = CompletionRequest.parse({"prompt": prompt, "stream": stream, **params})
        job = await asyncio.to_thread(self._text_job, req)
        return self._astream(job) if stream else await _alast(self._astream(job))

    # --- building jobs ---------------------------------------------------------------------------------

    def chat_request(self, messages, **params) -> tuple[list[int], GenerationParams]:
        """The prompt ids and the engine's parameters a chat completion request becomes (what
        `create_chat_completion` submits for each choice), to drive `engine` directly."""
        job = self._chat_job(ChatCompletionRequest.parse({"messages": messages, **params}))
        return job.prompts[0], job.gen

    def _chat_job(self, req: ChatCompletionRequest) -> "_Job":
        tok = self.tokenizer
        mode, name = read_tool_choice(req.tool_choice, req.tools)  # "none" | "auto" | "required" | "function"
        tools = prompt_tools = req.tools
        if mode == "function":
            prompt_tools = [t for t in tools if t.get("function", {}).get("name") == name]
        if req.continue_final_message and mode in ("required", "function"):
            raise RequestError(f"tool_choice {mode!r} starts a new answer with a tool call; it cannot continue "
                               "the final message", param="continue_final_message")
        parallel = req.parallel_tool_calls
        answer = structured.response_format_grammar(req.response_format)
        if answer is not None and req.continue_final_message:
            raise RequestError("response_format constrains a whole answer; it cannot continue the final message",
                               param="continue_final_message")
        prompt = encode_chat(tok, req.messages, tools=prompt_tools, continue_final_message=req.continue_final_message)
        gen = self._generation_params(req, len(prompt), "messages")
        constraint = None
        if mode in ("required", "function"):  # [TOOL_CALLS], then calls that validate
            grammar = structured.tool_calls_grammar(read_tools(prompt_tools), tok.tool_calls_id, parallel)
            constraint = structured.make_constraint(tok, grammar, "tool_choice")
        elif mode == "auto" and answer is not None:  # the answer, or calls
            grammar = structured.tool_calls_grammar(read_tools(tools), tok.tool_calls_id, parallel, answer)
            constraint = structured.make_constraint(tok, grammar, "response_format")
        elif mode == "auto" and structured.available():  # free text, but calls once [TOOL_CALLS] is out
            grammar = structured.tool_calls_grammar(read_tools(tools), tok.tool_calls_id, parallel)
            constraint = structured.make_constraint(tok, grammar, "tools", trigger=tok.tool_calls_id)
        elif answer is not None:
            constraint = structured.make_constraint(tok, answer, "response_format")
        if mode == "none" and tools:  # the tools stay in the prompt, but the model may not call them
            gen = dataclasses.replace(gen, logit_bias={**(gen.logit_bias or {}), tok.tool_calls_id: -math.inf})
        elif mode in ("required", "function"):  # the answer starts with [TOOL_CALLS]
            gen = dataclasses.replace(gen, first_token=tok.tool_calls_id)
        gen = _constrained(gen, constraint)
        return _Job(self, "chat", [prompt], gen, req, tools_enabled=bool(tools) and mode != "none")

    def _text_job(self, req: CompletionRequest) -> "_Job":
        prompts = self._text_prompts(req.prompt)
        answer = structured.response_format_grammar(req.response_format)
        gen = self._generation_params(req, max(len(ids) for ids in prompts), "prompt")
        if answer is not None:
            gen = _constrained(gen, structured.make_constraint(self.tokenizer, answer, "response_format"))
        if len(prompts) * req.n > MAX_N:
            raise RequestError(f"{len(prompts)} prompts x n={req.n} asks for {len(prompts) * req.n} choices; "
                               f"at most {MAX_N} per request", param="prompt")
        return _Job(self, "text", prompts, gen, req, tools_enabled=False)

    def _generation_params(self, req: GenerationRequest, prompt_len: int, prompt_param: str) -> GenerationParams:
        return req.generation_params(prompt_len=prompt_len, prompt_param=prompt_param, max_seq_len=self.max_seq_len,
                                     vocab_size=self.model.args.vocab_size)

    def _text_prompts(self, prompt) -> list[list[int]]:
        """The prompt ids of each prompt in a completions request: a string (encoded with BOS), a list
        of token ids (as they are), or a non-empty list of either."""
        def is_ids(x) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str) or is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a string, a list of token ids, or a non-empty list of either",
                               param="prompt", code="invalid_type")
        prompts = []
        vocab = self.model.args.vocab_size
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                prompts.append(self.tokenizer.encode(p, bos=True))
            elif is_ids(p):
                bad = next((t for t in p if not 0 <= t < vocab), None)
                if bad is not None:
                    raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param=f"prompt[{i}]")
                prompts.append(list(p))
            else:
                raise RequestError("each prompt must be a string or a non-empty list of token ids", param=f"prompt[{i}]",
                                   code="invalid_type")
        return prompts

    # --- running jobs ----------------------------------------------------------------------------------

    def _stream(self, job: "_Job") -> Iterator[dict]:
        events: queue.Queue = queue.Queue()
        seqs = job.submit(lambda i, ev: events.put((i, ev)))
        try:
            yield from job.opening()
            while not job.done:
                while events.empty() and self._thread is None:
                    self.engine.step()  # no engine thread: run the engine here
                i, ev = events.get()
                yield from job.on_event(i, ev)
                if job.choices[i].stopped_early:
                    self.engine.cancel(seqs[i])
            yield from job.closing()
        finally:
            job.cancel_unfinished(seqs)

    async def _astream(self, job: "_Job") -> AsyncIterator[dict]:
        if self._thread is None:
            raise RuntimeError("the async API needs the engine thread: call start() first")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = job.submit(lambda i, ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
        try:
            for chunk in job.opening():
                yield chunk
            while not job.done:
                i, ev = await events.get()
                for chunk in job.on_event(i, ev):
                    yield chunk
                if job.choices[i].stopped_early:
                    self.engine.cancel(seqs[i])
            for chunk in job.closing():
                yield chunk
        finally:
            job.cancel_unfinished(seqs)


class _Choice:
    """One choice's decoding state: detokenizer, tool-call capture, counts, logprobs."""

    def __init__(self, job: "_Job", index: int):
        self.index = index
        self.detok = StreamingDetokenizer(job.llm.tokenizer, job.stop)
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


class _Job:
    """One request: n engine sequences per prompt, and the chunks made from their events."""

    def __init__(self, llm: Mistral, kind: str, prompts: list[list[int]], gen: GenerationParams,
                 req: GenerationRequest, *, tools_enabled: bool):
        self.llm, self.kind, self.prompts, self.gen, self.tools_enabled = llm, kind, prompts, gen, tools_enabled
        self.n, self.stop, self.stream, self.include_usage = req.n, req.stop, req.stream, req.include_usage
        self.id = ("chat-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [_Choice(self, i) for i in range(len(prompts) * self.n)]  # choice p * n + i: sample i of prompt p
        self.seqs: list = []  # the engine's sequences, once submitted

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def submit(self, emit) -> list:
        seqs = []
        try:
            for k in range(len(self.choices)):
                prompt, i = self.prompts[k // self.n], k % self.n
                gen = self.gen if self.gen.seed is None else dataclasses.replace(self.gen, seed=self.gen.seed + i)
                seqs.append(self.llm.engine.add(prompt, gen, lambda ev, k=k: emit(k, ev)))
        except QueueFull as e:
            for seq in seqs:
                self.llm.engine.cancel(seq)
            raise RequestError(f"the server is busy: {e}", code="queue_full") from None
        self.seqs = seqs
        return seqs

    def cancel_unfinished(self, seqs) -> None:
        for seq, choice in zip(seqs, self.choices):
            if choice.finish_reason is None or choice.stopped_early:
                self.llm.engine.cancel(seq)

    # --- events -> chunks ------------------------------------------------------------------------------

    def opening(self) -> Iterator[dict]:
        if self.stream and self.kind == "chat":
            for c in self.choices:
                yield self._chunk(c, {"role": "assistant", "content": ""})

    def on_event(self, i: int, ev) -> Iterator[dict]:
        c = self.choices[i]
        if c.finish_reason is not None:
            return  # events after a stop string matched
        tok = self.llm.tokenizer
        if isinstance(ev, TokenEvent):
            c.tokens += 1
            if self.gen.logprobs:
                entry = self._logprob_entry(ev)
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

    def _content(self, c: _Choice, text: str) -> Iterator[dict]:
        if not text:
            return
        c.content += text
        if self.stream:
            yield self._chunk(c, {"content": text} if self.kind == "chat" else text)

    def closing(self) -> Iterator[dict]:
        if self.stream:
            if self.include_usage:
                yield {**self._envelope, "choices": [], "usage": self._usage()}
            return
        yield self._completion()

    # --- the OpenAI shapes ---------------------------------------------------------------------------

    @functools.cached_property
    def _envelope(self) -> dict:
        """The fields every chunk (or the completion) of this job shares; copied into each."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        if not self.stream:
            obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.llm.model_name,
                "system_fingerprint": self.llm.system_fingerprint}

    def _chunk(self, c: _Choice, delta, finish_reason: str | None = None) -> dict:
        logprobs, c.pending_logprobs = c.pending_logprobs, []
        if self.kind == "chat":
            choice = {"index": c.index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": c.index, "text": delta if isinstance(delta, str) else "",
                      "logprobs": self._text_logprobs(logprobs) if logprobs else None, "finish_reason": finish_reason}
        return {**self._envelope, "choices": [choice]}

    def _completion(self) -> dict:
        choices = []
        for c in self.choices:
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": c.content if (c.content or not c.tool_calls) else None}
                if c.tool_calls:
                    message["tool_calls"] = c.tool_calls
                choices.append({"index": c.index, "message": message,
                                "logprobs": {"content": c.logprobs} if self.gen.logprobs else None,
                                "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": c.content,
                                "logprobs": self._text_logprobs(c.logprobs) if self.gen.logprobs else None,
                                "finish_reason": c.finish_reason})
        return {**self._envelope, "choices": choices, "usage": self._usage()}

    def _usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        prompt = sum(len(ids) for ids in self.prompts)  # each prompt counted once, whatever n is
        cached = sum(seq.cached for seq in self.seqs[:: self.n])  # as its first sample found it in the prefix cache
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": None}

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        tok = self.llm.tokenizer
        if tok.is_byte(token):
            b = tok.byte_value[token]
            return bytes([b]).decode("utf-8", errors="backslashreplace"), [b]
        if tok.is_control(token):
            return tok.id_to_piece(token), []
        text = tok.id_to_piece(token).replace("\u2581", " ")
        return text, list(text.encode())

    def _logprob_entry(self, ev: TokenEvent) -> dict:
        text, raw = self._token_text(ev.token)
        top = []
        for token, logprob in ev.top_logprobs or ():
            t, b = self._token_text(token)
            top.append({"token": t, "logprob": _finite(logprob), "bytes": b})
        return {"token": text, "logprob": _finite(ev.logprob), "bytes": raw, "top_logprobs": top}

    @staticmethod
    def _text_logprobs(entries: list[dict]) -> dict:
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": None}


# --- helpers -------------------------------------------------------------------------------------------


def _constrained(gen: GenerationParams, constraint) -> GenerationParams:
    """The parameters with a grammar; EOS must stay free for it, since a grammar ends the answer there."""
    if constraint is None:
        return gen
    if constraint.trigger is not None and (gen.ignore_eos or gen.min_tokens):
        return gen  # tool_choice "auto" asked nothing: its calls are left as the model writes them
    if gen.ignore_eos or gen.min_tokens:
        param = "ignore_eos" if gen.ignore_eos else "min_tokens"
        raise RequestError(f"{param} cannot be combined with a constrained answer (response_format or "
                           "tool_choice): the grammar ends the answer with EOS", param=param)
    return dataclasses.replace(gen, constraint=constraint)


def _finite(logprob: float) -> float:
    """JSON has no -inf (a token the model rules out, a forced one included) nor NaN: such logprobs
    go out as -9999.0, as vLLM writes them, so that every answer stays valid JSON."""
    return logprob if math.isfinite(logprob) else -9999.0


def _last(it: Iterator[dict]) -> dict:
    result = None
    for result in it:
        pass
    return result


async def _alast(it: AsyncIterator[dict]) -> dict:
    result = None
    async for result in it:
        pass
    return result


def dumps(obj: dict) -> str:
    """Compact JSON for a chunk (what the server frames as an SSE event). U+0085, U+2028 and U+2029,
    which JSON may leave raw, are escaped: line readers built on str.splitlines (httpx's among them)
    break an event at them, though SSE ends lines only at CR and LF."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")

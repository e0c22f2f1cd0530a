"""`Mistral`: chat and text completions that return what an OpenAI-compatible provider returns.

    llm = Mistral.from_pretrained("weights/Mistral-7B-Instruct-v0.3")   # a GPU in bf16 if there is one, else the CPU
    for chunk in llm.create_chat_completion(messages=[...], max_tokens=512, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

The data flows one way: request (protocol.py) -> prompt ids and engine parameters (prepare.py) ->
engine (engine.py: prefill, decode, sampling) -> token events -> one request's choices (job.py:
detokenizer, stop strings, tool calls) -> `chat.completion(.chunk)` dicts (responses.py). Every
object is plain JSON-serialisable data in OpenAI's shape. This file is the facade: loading, the
engine's thread, and the waiting for events.

Two ways to drive the engine: with no engine thread running, iterating a completion runs engine
steps on the caller's thread; after `start()` (what the server does) a background thread runs the
engine and any number of callers, sync or async, wait for their own events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import queue
import threading
from pathlib import Path
from typing import AsyncIterator, Iterator

import torch

from .engine import Engine, GenerationParams
from .errors import RequestError
from .handoff import Handoff
from .job import Job
from .prepare import Prepared, prepare_chat, prepare_text
from .prompt import encode_chat
from .protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .tokenizer import Tokenizer


class Mistral:
    """A loaded model with its tokenizer and generation engine."""

    def __init__(self, model, tokenizer: Tokenizer, *, model_name: str = "mistral", max_seq_len: int = 8192,
                 **engine_options):
        """engine_options: the Engine's (engine.py): max_batch, fixed_batch_shape, max_waiting,
        cuda_graphs, compile, kv_cache_gb, prefix_caching, prefill_chunk, prefill_chunk_decay."""
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        if tokenizer.vocab_size != model.args.vocab_size:
            raise RequestError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is {model.args.vocab_size}")
        self.engine = Engine(model, max_seq_len=max_seq_len, eos_id=tokenizer.eos_id, **engine_options)
        weight = model.output.weight
        self.system_fingerprint = f"mistral-from-scratch-{model.ops.name}-{str(weight.dtype).removeprefix('torch.')}-{weight.device.type}"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._handoff = Handoff()  # async streams' events, each step's out before the next (handoff.py)

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
        max_seq_len: int = 8192,
        model_name: str | None = None,
        format: str | None = None,
        token: str | None = None,
        revision: str | None = None,
        quiet: bool = False,
        quantize: str | None = None,
        **engine_options,
    ) -> "Mistral":
        """Load a local weights folder, or download a Hub repo (one format only) and load it.

        device: default "cuda" when available, else "cpu". kernels: which code computes the model's
        operations: "torch" (PyTorch's own operators, no custom kernels), "cpu" (the C++ mat-vec
        kernels of kernels/cpu, built on first use), "triton" (the fused Triton kernels, for CUDA) or
        "auto" (triton on CUDA; on a CPU "cpu" where its kernels build, else torch). dtype: default bfloat16 on CUDA, the
        checkpoint's own dtype on CPU. max_seq_len: the KV cache's length per row (v0.3 reaches
        32768; 8192 x 8 rows of cache take 8 GiB in bf16). engine_options go to the Engine (engine.py)
        as they are: max_batch (default 8); fixed_batch_shape; max_waiting (default 256); cuda_graphs:
        replay each decode step from a CUDA graph, default on for CUDA with the Triton kernels;
        compile: run each decode step through torch.compile, the fast path on the CPU (2-3.5x; the
        first step compiles, ~10 s to a minute); kv_cache_gb: the KV cache's pool of blocks (default:
        max_batch x max_seq_len positions); prefix_caching: reuse the cached blocks of a prompt's
        prefix; prefill_chunk: read long prompts that many tokens per step, between the running rows'
        decode steps; prefill_chunk_decay: past that position, chunks shrink as 1 / position.
        token: default the HF_TOKEN variable. quantize: "int8", "int4" or "int4-128" quantizes the
        linear layers while loading, tensor by tensor (see quantize.py); dtype is then the activations'.
        """
        from .devices import resolve_device
        from .hub import resolve_weights
        from .loader import load_model

        try:  # a misspelt option fails before the load, not after it
            inspect.signature(Engine).bind_partial(**engine_options)
        except TypeError as e:
            raise TypeError(f"Mistral.from_pretrained(): {e}") from None
        folder = resolve_weights(path_or_repo_id, format=format, token=token, revision=revision)
        device = resolve_device(device)
        if dtype is None and device.type == "cuda":
            dtype = "bfloat16"
        model = load_model(folder, device=device, dtype=dtype, kernels=kernels, prefer=format,
                           max_seq_len=max(max_seq_len, 1), quiet=quiet, quantize=quantize)
        tokenizer = Tokenizer.from_path(folder)
        name = model_name or (str(path_or_repo_id) if not Path(path_or_repo_id).exists() else Path(folder).name)
        return cls(model, tokenizer, model_name=name, max_seq_len=max_seq_len, **engine_options)

    # --- the background engine thread (the server's mode) --------------------------------------------

    def start(self) -> None:
        """Run the engine on a background thread, so that many callers can generate at once."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.engine.serve_forever, args=(self._stop, self._handoff.flush),
                                            name="mistral-engine", daemon=True)
            self._thread.start()

    def warm_up(self, *settings: dict) -> None:
        """Generate a few tokens and throw them away, so that what a decode step prepares on first
        use (the compilations of `compile=True`, CUDA graph capture, first-call allocations) is done
        before the first real request: at every batch size that needs its own preparation (see
        `Engine.warm_up_batches`), for each of `settings`, the sampling parameters to prepare for
        (dicts of create_completion's keyword arguments: temperature, top_p, ...), since each set of
        sampling features is a step of its own. By default: greedy, and sampling at temperature 1
        (the API's default). Call it before `start()`.

        Each warm-up prompt fills one attention step (`Engine.attention_step`: a cache block on the
        CPU) but a position, and its two decode steps attend over one step and then two: the
        compiled step's first graph is specialized to the first length it sees (torch 2.13 equates
        it with the cache's static block size), and the second length compiles the graph that
        serves every length after it. Without that, the first answer longer than a block
        recompiled in the middle of serving (2.6 s on the small preset, every stream frozen
        meanwhile)."""
        if self._thread is not None:
            raise RuntimeError("warm_up() runs the engine on the calling thread: call it before start()")
        from .progress import progress

        words = self.tokenizer.encode("warm-up", bos=True)
        filler = self.tokenizer.encode("up", bos=False) or words[-1:]
        step = self.engine.attention_step()  # the whole cache: one length only, nothing to fill
        length = len(words) if step >= self.max_seq_len else max(len(words), min(step - 1, self.max_seq_len - 3))
        prompt = (words + filler * length)[:length]
        settings = settings or ({"temperature": 0.0}, {"temperature": 1.0})
        steps = [(setting, rows) for setting in settings for rows in self.engine.warm_up_batches()]
        for setting, rows in progress(steps, desc="warming up", unit="step"):
            req = CompletionRequest.parse({"prompt": prompt, **setting})
            gen = req.generation_params(prompt_len=len(prompt), prompt_param="prompt", max_seq_len=self.max_seq_len,
                                        vocab_size=self.model.args.vocab_size)
            params = dataclasses.replace(gen, max_tokens=3, ignore_eos=True)  # a prefill, then two decode steps
            for _ in range(rows):
                self.engine.add(prompt, params, lambda event: None)
            self.engine.run_until_idle()
        self.engine.prefill_step.warm_up()

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
        job = self._job("chat", ChatCompletionRequest.parse({"messages": messages, "stream": stream, **params}))
        return self._stream(job) if stream else _last(self._stream(job))

    def create_completion(self, prompt: str | list, *, stream: bool = False, **params) -> dict | Iterator[dict]:
        """A `text_completion` for plain text (BOS + the prompt; no chat format).

        As in OpenAI's API, `prompt` may also be a list of strings, a list of token ids (used as
        they are, no BOS added), or a list of such lists: each prompt gets `n` choices, numbered
        prompt by prompt (choice `p * n + i` is sample i of prompt p)."""
        job = self._job("text", CompletionRequest.parse({"prompt": prompt, "stream": stream, **params}))
        return self._stream(job) if stream else _last(self._stream(job))

    async def acreate_chat_completion(self, messages: list[dict], *, stream: bool = False, **params):
        """The async twin of create_chat_completion; needs `start()`. Validation errors raise at once.
        The prompt is built and tokenized on a worker thread: a long one does not hold up the event loop."""
        req = ChatCompletionRequest.parse({"messages": messages, "stream": stream, **params})
        job = await asyncio.to_thread(self._job, "chat", req)
        return self._astream(job) if stream else await _alast(self._astream(job))

    async def acreate_completion(self, prompt: str | list, *, stream: bool = False, **params):
        req = CompletionRequest.parse({"prompt": prompt, "stream": stream, **params})
        job = await asyncio.to_thread(self._job, "text", req)
        return self._astream(job) if stream else await _alast(self._astream(job))

    # --- requests -> jobs ---------------------------------------------------------------------------

    def chat_request(self, messages, **params) -> tuple[list[int], GenerationParams]:
        """The prompt ids and the engine's parameters a chat completion request becomes (what
        `create_chat_completion` submits for each choice), to drive `engine` directly."""
        prepared = self._prepare(prepare_chat, ChatCompletionRequest.parse({"messages": messages, **params}))
        return prepared.prompts[0], prepared.gen

    def _prepare(self, prepare, req: GenerationRequest) -> Prepared:
        return prepare(self.tokenizer, req, max_seq_len=self.max_seq_len, vocab_size=self.model.args.vocab_size)

    def _job(self, kind: str, req: GenerationRequest) -> Job:
        prepared = self._prepare(prepare_chat if kind == "chat" else prepare_text, req)
        return Job(self.engine, self.tokenizer, kind, prepared, req, model=self.model_name,
                   system_fingerprint=self.system_fingerprint)

    # --- running jobs: the two ways of waiting for the engine's events --------------------------------

    def _stream(self, job: Job) -> Iterator[dict]:
        events: queue.Queue = queue.Queue()
        job.submit(lambda i, ev: events.put((i, ev)))
        try:
            yield from job.opening()
            while not job.done:
                while events.empty() and self._thread is None:
                    self.engine.step()  # no engine thread: run the engine here
                yield from job.on_event(*events.get())
        finally:
            job.cancel_unfinished()

    async def _astream(self, job: Job) -> AsyncIterator[dict]:
        if self._thread is None:
            raise RuntimeError("the async API needs the engine thread: call start() first")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.submit(lambda i, ev: self._handoff.send(loop, events.put_nowait, (i, ev)))
        try:
            for chunk in job.opening():
                yield chunk
            while not job.done:
                for chunk in job.on_event(*await events.get()):
                    yield chunk
        finally:
            job.cancel_unfinished()


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

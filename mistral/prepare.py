"""A parsed request -> what the engine runs: the prompt ids and the engine's parameters.

For a chat request that is the v3 prompt (prompt.py) and what tool_choice and response_format ask
of the answer: a grammar (structured.py), a forced first [TOOL_CALLS], or [TOOL_CALLS] ruled out.
For a text completion, the ids of each prompt. Every refusal is a RequestError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import structured
from .engine import GenerationParams
from .errors import RequestError
from .prompt import encode_chat, read_tool_choice, read_tools
from .protocol import MAX_N, ChatCompletionRequest, CompletionRequest
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Prepared:
    prompts: list[list[int]]  # one per prompt; each gets the request's n choices
    gen: GenerationParams
    tools_enabled: bool  # [TOOL_CALLS] in the answer starts tool calls, to be parsed out of the text


def prepare_chat(tok: Tokenizer, req: ChatCompletionRequest, *, max_seq_len: int, vocab_size: int) -> Prepared:
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
    gen = req.generation_params(prompt_len=len(prompt), prompt_param="messages", max_seq_len=max_seq_len,
                                vocab_size=vocab_size)
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
    return Prepared([prompt], _constrained(gen, constraint), tools_enabled=bool(tools) and mode != "none")


def prepare_text(tok: Tokenizer, req: CompletionRequest, *, max_seq_len: int, vocab_size: int) -> Prepared:
    prompts = _text_prompts(tok, req.prompt, vocab_size)
    answer = structured.response_format_grammar(req.response_format)
    gen = req.generation_params(prompt_len=max(len(ids) for ids in prompts), prompt_param="prompt",
                                max_seq_len=max_seq_len, vocab_size=vocab_size)
    if answer is not None:
        gen = _constrained(gen, structured.make_constraint(tok, answer, "response_format"))
    if len(prompts) * req.n > MAX_N:
        raise RequestError(f"{len(prompts)} prompts x n={req.n} asks for {len(prompts) * req.n} choices; "
                           f"at most {MAX_N} per request", param="prompt")
    return Prepared(prompts, gen, tools_enabled=False)


def _text_prompts(tok: Tokenizer, prompt, vocab_size: int) -> list[list[int]]:
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
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            prompts.append(tok.encode(p, bos=True))
        elif is_ids(p):
            bad = next((t for t in p if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=f"prompt[{i}]")
            prompts.append(list(p))
        else:
            raise RequestError("each prompt must be a string or a non-empty list of token ids", param=f"prompt[{i}]",
                               code="invalid_type")
    return prompts


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

"""Measurement, in one place: `mistral bench` and what the benchmark scripts in scripts/ share.

    command.py            `mistral bench`: builds a random full-size model, measures the table's rows
    timing.py             timers, the machine's ceilings, per-token stamps of an engine run, bytes per token
    steps.py              the decode and prefill steps `mistral bench` times (no host sync; CUDA graphs)
    collectives.py        the collectives of a tensor-parallel decode step, each timed alone
    transformers_peer.py  transformers' model around our tensors, and its decode rates (the peer)

Nothing in the runtime (`from mistral import Mistral`, `mistral serve`) imports this package.
"""

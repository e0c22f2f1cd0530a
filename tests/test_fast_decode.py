"""The fast decode path: merged projections, the strided SwiGLU gate, CUDA-graph decode.

On the CPU: batch buckets, merged wq|wk|wv and w1|w3 against transformers (PyTorch ops and the Triton
kernels under the interpreter), and the engine's `cuda_graphs` option. With a CUDA GPU (tests marked
`gpu`, run by scripts/gpu_check.sh): the engine replaying CUDA graphs gives the tokens transformers'
greedy `generate` gives, and the same tokens and logprobs as the eager engine for every sampling
feature, at batch sizes that hit several buckets.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mistral.args import ModelArgs
from mistral.cuda_graphs import batch_buckets, bucket_for
from mistral.engine import Engine, FinishEvent, GenerationParams, TokenEvent
from mistral.loader import load_model
from mistral.merged import merge_projections, unmerged
from mistral.make_random import make_random

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                 norm_eps=1e-5, vocab_size=512, rope_theta=1e6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same random model in both formats: ours to load, Hugging Face's for the oracle."""
    root = tmp_path_factory.mktemp("fast-decode")
    return (make_random(root / "consolidated", ARGS, "consolidated", "float32", seed=11, tokenizer=False),
            make_random(root / "hf", ARGS, "hf", "float32", seed=11, tokenizer=False))


@pytest.fixture(scope="module")
def oracle(folders):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(folders[1], dtype=torch.float32, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------------------------
# Batch buckets
# ---------------------------------------------------------------------------------------------


def test_batch_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    buckets = batch_buckets(12)
    assert [bucket_for(n, buckets) for n in range(1, 13)] == [1, 2, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(13, buckets)
    with pytest.raises(ValueError, match="positive"):
        batch_buckets(0)


# ---------------------------------------------------------------------------------------------
# Merged projections and the SwiGLU gate on strided halves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@torch.inference_mode()
def test_merged_projections_match_transformers(folders, oracle, kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    model = load_model(folders[0], device=DEVICE, kernels=kernels, max_seq_len=64, quiet=True)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    merge_projections(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == names  # checkpoint names unchanged
    attention, ff = model.layers[1].attention, model.layers[1].feed_forward
    wqkv, w13 = attention.project_qkv.weight, ff.project_gate_up.weight
    assert wqkv.shape == (ARGS.n_heads * ARGS.head_dim + 2 * ARGS.n_kv_heads * ARGS.head_dim, ARGS.dim)
    assert attention.wk.weight.data_ptr() == wqkv[ARGS.n_heads * ARGS.head_dim :].data_ptr()  # a view
    assert ff.w3.weight.data_ptr() == w13[ARGS.hidden_dim :].data_ptr()

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 13), generator=g)
    expected = oracle(tokens).logits
    assert rel_err(model(tokens.to(DEVICE)).cpu(), expected) <= 1e-5
    # decode through the cache: rows at different positions, one token at a time
    cache = model.new_cache(2, 32)
    model(tokens[:, :9].to(DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE), cache)
    for t in range(9, 13):
        step = model(tokens[:, t : t + 1].to(DEVICE), torch.tensor([t, t], device=DEVICE), cache)
    assert rel_err(step[:, -1].cpu(), expected[:, -1]) <= 1e-5
    with unmerged(model):  # the separate matmuls again, over the same storage
        assert not isinstance(attention.project_qkv, torch.nn.Module)
        assert rel_err(model(tokens.to(DEVICE)).cpu(), expected) <= 1e-5
    assert attention.project_qkv.weight is wqkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_on_the_halves_of_one_matmul_output(dtype):
    """Merged w1|w3 hands the kernel two strided views of one [rows, 2 * hidden] tensor."""
    pytest.importorskip("triton")
    from kernels.swiglu import silu_mul

    g = torch.Generator().manual_seed(5)
    both = (3 * torch.randn(2, 7, 2 * 300, generator=g)).to(dtype=dtype, device=DEVICE)
    gate, up = both.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    expected = (F.silu(gate.float()).to(dtype).float() * up.float()).to(dtype)  # silu rounded, as F.silu's output is
    out = silu_mul(gate, up, out=torch.full(gate.shape, float("nan"), dtype=dtype, device=DEVICE))
    torch.testing.assert_close(out, expected, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 2e-2)


# ---------------------------------------------------------------------------------------------
# The engine's cuda_graphs option
# ---------------------------------------------------------------------------------------------


def test_cuda_graphs_option_on_the_cpu(folders):
    model = load_model(folders[0], device="cpu", kernels="torch", max_seq_len=64, quiet=True)
    assert Engine(model, max_batch=2).decode_step.graphs is None  # auto: off without CUDA
    assert Engine(model, max_batch=2, cuda_graphs=False).decode_step.graphs is None
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(model, max_batch=2, cuda_graphs=True)


def run_engine(engine: Engine, requests: list[tuple[list[int], GenerationParams]]) -> list[list[TokenEvent]]:
    """Add every request at once, step until all are done; each request's token events."""
    events: list[list] = [[] for _ in requests]
    for i, (prompt, params) in enumerate(requests):
        engine.add(prompt, params, events[i].append)
    engine.run_until_idle()
    for evs in events:
        assert isinstance(evs[-1], FinishEvent) and evs[-1].reason in ("length", "stop"), evs[-1]
    return [[e for e in evs if isinstance(e, TokenEvent)] for evs in events]


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_graph_engine_greedy_equals_transformers(folders, oracle):
    model = load_model(folders[0], device="cuda", kernels="triton", max_seq_len=128, quiet=True)
    engine = Engine(model, max_batch=4, max_seq_len=128)
    assert engine.decode_step.graphs is not None  # auto: on for CUDA + Triton
    prompt = [1, 17, 300, 42, 99, 7]
    (tokens,) = run_engine(engine, [(prompt, GenerationParams(max_tokens=24, temperature=0.0, ignore_eos=True))])
    expected = oracle.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, len(prompt):]
    assert [e.token for e in tokens] == expected.tolist()
    assert engine.decode_step.graphs.disabled is None and engine.decode_step.graphs.replays == 23  # every decode step replayed a graph


SAMPLING = [
    GenerationParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3),
    GenerationParams(max_tokens=17, temperature=0.9, seed=1, ignore_eos=True),
    GenerationParams(max_tokens=20, temperature=1.1, top_k=20, top_p=0.9, min_p=0.01, seed=2, ignore_eos=True),
    GenerationParams(max_tokens=19, temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3,
                     repetition_penalty=1.2, seed=3, ignore_eos=True),
    GenerationParams(max_tokens=20, temperature=0.7, logit_bias={5: 3.0, 6: -100.0}, seed=4, min_tokens=5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fixed_batch_shape", [False, True])
@torch.inference_mode()
def test_gpu_graph_engine_equals_eager_engine(folders, fixed_batch_shape):
    """Five requests with every sampling feature, decoded together (buckets 1 to 8 as they finish),
    replaying CUDA graphs and eagerly: the same tokens and logprobs."""
    model = load_model(folders[0], device="cuda", kernels="triton", max_seq_len=128, quiet=True)
    prompts = [[1, 5 + i, 40 * i + 3, 7, 11 * i + 2][: 3 + i % 3] for i in range(len(SAMPLING))]
    requests = list(zip(prompts, SAMPLING))
    runs = {}
    for graphs in (True, False):
        engine = Engine(model, max_batch=8, max_seq_len=128, fixed_batch_shape=fixed_batch_shape, cuda_graphs=graphs)
        runs[graphs] = run_engine(engine, requests)
        if graphs:
            assert engine.decode_step.graphs.disabled is None and engine.decode_step.graphs.replays > 0
    for with_graphs, eager in zip(runs[True], runs[False]):
        assert [e.token for e in with_graphs] == [e.token for e in eager]
        for a, b in zip(with_graphs, eager):
            if b.logprob is not None:
                assert math.isclose(a.logprob, b.logprob, rel_tol=1e-4, abs_tol=1e-4)


@torch.inference_mode()
def test_each_request_draws_in_a_mixed_batch_what_it_draws_alone(folders):
    """Five requests with different sampling features, decoded together on the CPU: each gets the
    tokens it gets alone. The batch's flags are the union of its rows' features (one row's logit_bias
    or penalties switch that work on for the whole batch); the other rows must not feel it."""
    model = load_model(folders[0], device="cpu", max_seq_len=128, quiet=True)
    prompts = [[1, 5 + i, 40 * i + 3, 7, 11 * i + 2][: 3 + i % 3] for i in range(len(SAMPLING))]
    requests = list(zip(prompts, SAMPLING))
    together = run_engine(Engine(model, max_batch=8, max_seq_len=128, fixed_batch_shape=True), requests)
    for request, tokens in zip(requests, together):
        (alone,) = run_engine(Engine(model, max_batch=8, max_seq_len=128, fixed_batch_shape=True), [request])
        assert [e.token for e in tokens] == [e.token for e in alone]

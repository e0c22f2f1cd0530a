"""The paged decode-attention kernel against the PyTorch reference on the gathered blocks, in Triton's
interpreter: ragged block tables, blocks shared between rows, and every block no row may read (and every
unwritten output element) NaN, so that reading one shows."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.paged_decode_attention import paged_decode_attention  # noqa: E402
from mistral.model import attention as reference_attention  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}


def gathered(pool: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    """Row keys (or values) [Hkv, length, D] from its blocks, as the engine's reference path reads them."""
    return pool[torch.tensor(table)].flatten(0, 1)[:length].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,window", [(16, None), (5, None), (16, 20)])
@pytest.mark.parametrize("num_splits", [1, 3, 8])  # split-KV; at 8 (5 once capped by the table) short rows leave splits empty
def test_paged_decode_matches_the_reference(dtype, block_size, window, num_splits):
    H, Hkv, D, num_blocks = 6, 2, 24, 20
    g = torch.Generator().manual_seed(0)
    k_pool = torch.full((num_blocks, block_size, Hkv, D), float("nan"))
    v_pool = torch.full((num_blocks, block_size, Hkv, D), float("nan"))
    lengths = [1, 3 * block_size + 2, 2 * block_size, 2 * block_size + 3]  # a row's positions, incl. the new one
    # rows 1 and 3 share their first two blocks (a common prompt prefix); row 2 ends on a block boundary
    tables = [[4], [7, 1, 12, 3], [9, 15], [7, 1, 18]]
    for table, n in zip(tables, lengths):
        for i, block in enumerate(table):
            filled = min(block_size, n - i * block_size)  # the rest of a row's last block stays NaN
            k_pool[block, :filled] = torch.randn(filled, Hkv, D, generator=g)
            v_pool[block, :filled] = torch.randn(filled, Hkv, D, generator=g)
    k_pool, v_pool = k_pool.to(dtype), v_pool.to(dtype)
    B = len(lengths)
    width = max(map(len, tables)) + 1  # unused entries point at block 0, which is all NaN
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    xq = torch.randn(B, 1, H, D, generator=g).to(dtype)
    pos = torch.tensor(lengths) - 1
    out = torch.full((B, 1, H, D), float("nan"), dtype=dtype)
    paged_decode_attention(xq, k_pool, v_pool, block_table, pos, window, out=out, num_splits=num_splits,
                           block_n=16 if num_splits > 1 else 64)
    assert not out.isnan().any()
    for b in range(B):
        keys, values = (gathered(p.float(), tables[b], lengths[b])[None] for p in (k_pool, v_pool))
        expected = reference_attention(xq[b : b + 1].float(), keys, values, pos[b : b + 1], window)
        torch.testing.assert_close(out[b : b + 1].float(), expected, **TOL[dtype])


def test_paged_decode_names_a_bad_block_table():
    pool = torch.zeros(4, 16, 2, 8)
    with pytest.raises(ValueError, match="block_table must be"):
        paged_decode_attention(torch.zeros(2, 1, 4, 8), pool, pool, torch.zeros(3, 1, dtype=torch.long),
                               torch.zeros(2, dtype=torch.long))


def test_the_engine_on_the_triton_backend_reads_its_paged_cache_in_place(tmp_path, monkeypatch):
    """The "triton" backend's engine cache hands attention the pool's blocks: two rows decoding together,
    the second over a prompt prefix cached by the first (its blocks shared), get through the paged kernel
    the logits the "torch" backend gets from gathered keys (in the interpreter, as on a GPU)."""
    import kernels.paged_decode_attention as paged
    from mistral.args import preset
    from mistral.engine import Engine, GenerationParams
    from mistral.loader import load_model
    from mistral.make_random import make_random

    folder = make_random(tmp_path / "w", preset("small"), "consolidated", "float32", seed=5)
    calls = []
    real = paged.paged_decode_attention

    def counted(*args, **kwargs):
        calls.append(args[3].shape)  # the block table
        return real(*args, **kwargs)

    monkeypatch.setattr(paged, "paged_decode_attention", counted)
    shared = list(range(100, 140))  # 40 tokens: two whole blocks of 16 to reuse
    prompts = [[1, *shared, 7], [1, *shared, 9, 11, 13]]
    seen = {}
    for kernels in ("torch", "triton"):
        model = load_model(folder, kernels=kernels, max_seq_len=96, quiet=True)
        engine = Engine(model, max_batch=2, max_seq_len=96)
        assert engine.cache.in_place == (kernels == "triton")
        logits, step = seen.setdefault(kernels, []), engine.decode_step

        def keep(*args, step=step, logits=logits):
            out = step(*args)
            logits.append(out[0].clone())
            return out

        engine.decode_step = keep
        greedy = GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        first = engine.add(prompts[0], greedy, lambda event: None)
        engine.step()  # the first prompt is read and its blocks registered: the second reuses them
        second = engine.add(prompts[1], greedy, lambda event: None)
        engine.run_until_idle()
        assert second.cached >= 32 and first.generated == second.generated == 4
    assert calls  # decode attention read the pool through the block table
    assert len(seen["triton"]) == len(seen["torch"])
    for got, want in zip(seen["triton"], seen["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

"""`mistral bench --preset small --quick` on the CPU: every figure of the table is in the
table and the JSON, measured or marked "n/a (needs CUDA)", none failed, and the correctness checks
(ours against transformers, bf16 against fp32) pass. The GPU run is scripts/gpu_check.sh."""

import json

import pytest

from mistral.args import preset
from mistral.cli import main

# Every row of the table, by key: (what it is, may it be n/a on a CPU)
EXPECTED = {
    "copy_bandwidth": False, "matmul_rate": False, "floor.b1.ctx128": False, "floor.b1.ctx4096": False,
    "correct.fp32_vs_transformers": False, "correct.transformers_vs_fp32": False,
    "correct.ours_vs_fp32": False, "correct.ours_vs_transformers": False,
    "prefill.torch": False, "prefill.torch.tflops": False, "ttft": False, "engine.b1": False,
    "decode.b8.torch": False, "decode.b64.torch": False, "memory.peak_speed": False,
    "target.floor": False, "target.vs_transformers": False,
}
for ctx in (128, 4096):
    EXPECTED.update({f"decode.b1.ctx{ctx}.torch": False, f"decode.b1.ctx{ctx}.transformers": False,
                     f"decode.b1.ctx{ctx}.triton": True, f"decode.b1.ctx{ctx}.triton_graph": True,
                     f"decode.b1.ctx{ctx}.triton_graph_merged": True, f"decode.b1.ctx{ctx}.transformers_compiled": True})


def test_bench_small_on_cpu(tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"  # a folder that does not exist yet: made
    assert main(["bench", "--preset", "small", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert set(EXPECTED) <= set(rows), f"missing rows: {sorted(set(EXPECTED) - set(rows))}"
    for key, may_be_na in EXPECTED.items():
        r = rows[key]
        assert not r["note"].startswith("error"), (key, r["note"])
        assert r["label"] in table
        if r["value"] is None:
            assert may_be_na and r["note"].startswith("n/a (needs CUDA)"), (key, r)
        else:
            assert r["value"] > 0, (key, r)
    for key in ("correct.fp32_vs_transformers", "correct.ours_vs_fp32"):
        assert rows[key]["note"].endswith("PASS"), rows[key]
    assert rows["correct.fp32_vs_transformers"]["value"] <= 1e-4
    assert "NOT met" not in table and ": met" not in table, "the targets are an H100's: a CPU table gives no verdict"

    # The floor is bandwidth / bytes per step, bytes counted here independently of describe.py:
    # every weight but the embedding table (one row of it), in bf16, plus the K and V read and written.
    a = preset("small")
    params = a.vocab_size * a.dim * 2 + a.dim + a.n_layers * (
        2 * a.dim + a.dim * a.n_heads * a.head_dim * 2 + 2 * a.dim * a.n_kv_heads * a.head_dim + 3 * a.dim * a.hidden_dim)
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2 * (128 + 2)  # positions 0..128 read, position 128 written
    weight_bytes = 2 * (params - a.vocab_size * a.dim + a.dim)
    floor = rows["copy_bandwidth"]["value"] * 1e9 / (weight_bytes + kv)
    assert rows["floor.b1.ctx128"]["value"] == pytest.approx(floor, rel=1e-6)

    meta = result["meta"]
    assert meta["preset"] == "small" and meta["device"] == "cpu" and meta["torch"] and meta["transformers"]
    assert table.splitlines()[0].startswith("# mistral bench: small")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--preset", "huge"], "unknown preset"),
])
def test_bench_bad_arguments(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_imports_neither_transformers_nor_the_server():
    """`mistral bench` runs on a GPU machine that may lack the server's packages (scripts/gpu_check.sh),
    and transformers is its peer, not a dependency: loading the command imports none of them."""
    import subprocess
    import sys

    code = ("import sys, mistral.cli, mistral.bench.command; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'transformers', 'fastapi', 'uvicorn', 'starlette', 'mistral_common', 'httpx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

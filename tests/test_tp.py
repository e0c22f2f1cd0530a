"""Tensor parallelism over 2 CPU processes (gloo), launched with torchrun: the sharded model computes
what the single-process one does, each rank holding about half the weights."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mistral.args import ModelArgs, preset
from mistral.loader import load_model
from mistral.make_random import make_random

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [1, 5, 900, 77, 3, 1000]
# Layers big enough next to the replicated embedding (and the Python process) for memory to tell.
ARGS = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=2048,
                 norm_eps=1e-5, vocab_size=1024, rope_theta=1e6)


def torchrun(*args: str, n: int = 2, timeout: float = 240, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port of its own) from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}  # this checkout's mistral, for the script
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {run.returncode}:\n{run.stderr[-4000:]}")
    return run


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return [make_random(root / fmt, ARGS, fmt, "float32", seed=7, tokenizer=False) for fmt in ("consolidated", "hf")]


def test_two_ranks_compute_the_single_process_logits_with_half_the_memory_each(checkpoints, tmp_path):
    out = tmp_path / "tp.json"
    torchrun("tests/tp_worker.py", str(out), ",".join(map(str, TOKENS)), *map(str, checkpoints))
    results = json.loads(out.read_text())
    ids = torch.tensor([TOKENS])
    for folder, result in zip(checkpoints, results):
        model = load_model(folder, quiet=True)
        with torch.inference_mode():
            expected = model(ids)[0]
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        for kind in ("prefill", "incremental"):
            got = torch.tensor(result[kind])
            assert (got - expected).abs().max().item() <= 1e-5, (folder.name, kind)
        embedding = model.tok_embeddings.weight.numel() * 4
        for rank in result["ranks"]:
            assert rank["kv_heads"] == ARGS.n_kv_heads // 2
            # the replicated embedding and norms whole, every other matrix halved
            assert rank["weight_bytes"] < (full + embedding) / 2 + 64 * 1024, (folder.name, rank)
            # What loading and running the shard added to the process: its weights, not the whole
            # model's (loaded whole, the same measure grows by 1.2x `full`: the file's pages are mapped).
            assert 0.4 * full < rank["rss_growth"] < 0.7 * full, (folder.name, rank, full)


def test_mistral_logits_under_torchrun_equals_one_process(checkpoints, tmp_path):
    folder = checkpoints[1]  # the HF format, fed one token at a time through rank 0's Leader
    tokens = ",".join(map(str, TOKENS))
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, "-m", "mistral.cli", "logits", str(folder), "--tokens", tokens, "--out", str(one)],
                   cwd=ROOT, check=True, capture_output=True)
    torchrun("-m", "mistral.cli", "logits", str(folder), "--tokens", tokens, "--out", str(two), "--incremental")
    a, b = load_file(one)["logits"], load_file(two)["logits"]
    assert a.shape == b.shape == (len(TOKENS), ARGS.vocab_size)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("quantize", ["int8", "int4"], ids=["int8-on-load", "int4-checkpoint"])
def test_quantized_logits_under_torchrun_equal_one_process(checkpoints, tmp_path, quantize):
    """int8: each rank quantizes the slices it reads, wo's and w2's column slices with their whole
    rows' scales (a max over the ranks); int4: read from a `mistral quantize` checkpoint, wo's and
    w2's column slices of the packed weights and of the groups' scales (groups of 32)."""
    from mistral.quantize import write_quantized

    folder, flags = checkpoints[0], ["--quantize", "int8"]
    if quantize == "int4":
        folder, flags = write_quantized(checkpoints[0], tmp_path / "int4", "int4"), []
    tokens = ",".join(map(str, TOKENS))
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, "-m", "mistral.cli", "logits", str(folder), "--tokens", tokens, "--out", str(one),
                    *flags], cwd=ROOT, check=True, capture_output=True)
    torchrun("-m", "mistral.cli", "logits", str(folder), "--tokens", tokens, "--out", str(two), *flags)
    a, b = load_file(one)["logits"], load_file(two)["logits"]
    unquantized = load_model(checkpoints[0], quiet=True)(torch.tensor([TOKENS]))[0]
    assert (a - unquantized).abs().max().item() > 1e-3  # quantized indeed
    assert (a - b).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small preset with the real v3 tokenizer, for generation."""
    return make_random(tmp_path_factory.mktemp("tp-small"), preset("small"), "consolidated", "float32", seed=11)


def generate(folder: Path, *flags: str) -> list[str]:
    return ["generate", str(folder), "--prompt", "Name three colours.", "--max-tokens", "24", "--device", "cpu",
            "--kernels", "torch", *flags]


@pytest.mark.parametrize("sampling", [
    ["--temperature", "0"],
    ["--temperature", "0.9", "--top-p", "0.95", "--seed", "5", "--repetition-penalty", "1.1"],
], ids=["greedy", "sampled"])
def test_generate_under_torchrun_gives_the_single_process_tokens(small, sampling):
    command = ["-m", "mistral.cli", *generate(small, *sampling)]
    one = subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    two = torchrun(*command).stdout
    assert len(one.strip()) > 10 and two == one


def needs_cpu_compile() -> None:
    try:
        import test_compile  # noqa: F401  (it skips itself where torch.compile cannot build CPU code)
    except pytest.skip.Exception as e:
        pytest.skip(str(e))


def test_compiled_decode_under_torchrun_gives_the_single_process_tokens(small):
    """Rank 0's engine runs its compiled decode step, rank 1 replays it through its compiled forward,
    their collectives inside both graphs."""
    needs_cpu_compile()
    command = ["-m", "mistral.cli", *generate(small, "--temperature", "0")]
    one = subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    two = torchrun(*command, "--compile", env={"TORCH_LOGS": "dynamo"})
    assert len(one.strip()) > 10 and two.stdout == one
    assert "eagerly from now on" not in two.stderr  # neither rank fell back
    # dynamo's log: what each rank compiled
    assert re.search(r"\[rank0\]:.*torchdynamo start tracing advance .*decode_step\.py", two.stderr)
    assert re.search(r"\[rank1\]:.*torchdynamo start tracing forward .*model\.py", two.stderr)


@pytest.mark.parametrize("broken", [0, 1], ids=["leader", "follower"])
def test_a_rank_that_cannot_compile_decodes_eagerly_in_step_with_the_other(small, broken):
    """One rank without a C++ compiler: its compiled step fails before running and it decodes
    eagerly, the other compiled; each call is still made once on each rank (rank 0's eager rerun
    is the call it announced), so the tokens are TP=1's."""
    needs_cpu_compile()
    command = generate(small, "--temperature", "0")
    one = subprocess.run([sys.executable, "-m", "mistral.cli", *command], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    ranks = launch([[*command, "--compile"]] * 2, env=[{"CXX": "/nonexistent"} if r == broken else {} for r in (0, 1)])
    (out, err0), (_, err1) = [rank.communicate(timeout=240) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], (err0[-2000:], err1[-2000:])
    assert out == one
    warning = "the compiled decode step failed" if broken == 0 else "rank 1: the compiled forward failed"
    assert warning in (err0, err1)[broken] and "InvalidCxxCompiler" in (err0, err1)[broken]
    assert "eagerly from now on" not in (err0, err1)[1 - broken]


# --- serve under torchrun -------------------------------------------------------------------------

SERVE_BATCH, SERVE_SEQ_LEN = 2, 192


@pytest.fixture(scope="module")
def tp_server(small, tmp_path_factory):
    """`torchrun ... mistral.cli serve` over 2 ranks; yields (root URL, the torchrun process)."""
    from test_server import free_port, wait_healthy

    port = free_port()
    log = tmp_path_factory.mktemp("tp-serve") / "stderr.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mistral.cli", "serve", str(small), "--port", str(port), "--max-batch", str(SERVE_BATCH),
           "--max-seq-len", str(SERVE_SEQ_LEN), "--device", "cpu", "--kernels", "torch", "--served-model-name", "small"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(root, timeout=120, process=process, log=log)
        yield root, process, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # torchrun and its workers
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_serve_under_torchrun_answers_as_one_process(small, tp_server):
    import openai

    from mistral.generate import Mistral

    root, _, _ = tp_server
    client = openai.OpenAI(base_url=f"{root}/v1", api_key="none", max_retries=0)
    library = Mistral.from_pretrained(small, "cpu", kernels="torch", max_batch=SERVE_BATCH,
                                      max_seq_len=SERVE_SEQ_LEN, fixed_batch_shape=True)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    expected = library.create_chat_completion(messages, max_tokens=20, temperature=0)["choices"][0]["message"]["content"]
    answer = client.chat.completions.create(model="small", messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="small", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected

    # Two at once: the second is prefilled into row 1, so the followers must find the same rows.
    prompts = [[{"role": "user", "content": text}] for text in ("Hello!", "What is the capital of France?")]
    alone = [library.create_chat_completion(m, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
             for m in prompts]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda m: client.chat.completions.create(
            model="small", messages=m, max_tokens=24, temperature=0).choices[0].message.content, prompts))
    assert together == alone


def test_a_cancelled_stream_under_torchrun_frees_its_row_and_the_ranks_stay_in_step(tp_server):
    import httpx

    root, _, _ = tp_server
    body = {"model": "small", "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": SERVE_SEQ_LEN - 16, "ignore_eos": True, "stream": True, "temperature": 0}  # fits the context
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{root}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            for _ in range(4):
                while not next(lines).startswith("data: "):
                    pass
            before = http.get(f"{root}/v1/debug/engine").json()
            assert before["running"] == 1
        deadline = time.monotonic() + 30
        while (state := http.get(f"{root}/v1/debug/engine").json())["running"]:
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        # Stopped long before its ~185 remaining tokens. Looser than test_server's 3 steps: a TP step of
        # the small model takes a few ms, and on a loaded 2-core machine (load average 12) the server's
        # event loop took up to 23 of them to see the closed connection.
        assert state["steps"] - before["steps"] <= 64, state
        # the followers replayed exactly the leader's calls: the next request still runs on every rank
        short = {**body, "stream": False, "max_tokens": 4}
        assert http.post(f"{root}/v1/chat/completions", json=short).json()["usage"]["completion_tokens"] == 4


def test_a_rank_dying_stops_the_server_with_an_error(tp_server):
    """Runs last: it takes the server down. torchrun sees its worker fail and stops the other."""
    import httpx

    root, process, log = tp_server
    workers = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)],
                                              capture_output=True, text=True).stdout.split()]
    ranks = {int(Path(f"/proc/{pid}/environ").read_bytes().split(b"RANK=")[1].split(b"\0")[0]): pid
             for pid in workers if b"\0RANK=" in Path(f"/proc/{pid}/environ").read_bytes()}
    os.kill(ranks[1], signal.SIGKILL)
    assert process.wait(timeout=60) != 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{root}/health", timeout=2)
    assert "rank      : 1" in log.read_text() and "SIGKILL" in log.read_text()


# --- clean failures -------------------------------------------------------------------------------


def launch(commands: list[list[str]], env: list[dict] | None = None) -> list[subprocess.Popen]:
    """One process per rank, with the variables torchrun would set (and each rank's `env`) but no
    torchrun watching over them: what each rank does about the others is its own."""
    from test_server import free_port

    common = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "WORLD_SIZE": str(len(commands))}
    env = env or [{}] * len(commands)
    return [subprocess.Popen([sys.executable, "-m", "mistral.cli", *command], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**common, **env[r], "RANK": str(r), "LOCAL_RANK": str(r)})
            for r, command in enumerate(commands)]


def test_a_rank_count_that_does_not_divide_the_heads_is_refused(small):
    from mistral.tp import Shard, TensorParallelError

    with pytest.raises(TensorParallelError, match=r"over 3 ranks needs n_kv_heads \(2\) to be divisible by 3; "
                                                  r"this model splits over 1, 2 ranks"):
        load_model(small, shard=Shard(0, 3), quiet=True)


def test_int4_groups_that_straddle_two_ranks_slices_are_refused(small, tmp_path):
    from mistral.quantize import write_quantized

    folder = write_quantized(small, tmp_path / "int4-256", "int4-256")  # wo: 256 inputs, 128 a rank
    ranks = launch([["logits", str(folder), "--tokens", "1,2", "--out", str(tmp_path / "x")]] * 2)
    for rank in ranks:
        _, err = rank.communicate(timeout=120)
        assert rank.returncode != 0
        assert ("tensor parallelism over 2 ranks splits wo's 256 input features into slices of 128, which int4 "
                "groups of 256 do not divide: use a group size that divides 128") in err


def test_ranks_that_read_different_weights_are_refused(tmp_path):
    folders = [make_random(tmp_path / str(seed), preset("small"), "consolidated", "float32", seed=seed, tokenizer=False)
               for seed in (1, 2)]
    ranks = launch([["logits", str(f), "--tokens", "1,2", "--out", str(tmp_path / "x")] for f in folders])
    for rank in ranks:
        _, err = rank.communicate(timeout=120)
        assert rank.returncode != 0
        assert "rank 1 read different weights from rank 0 (replicated tensors' values differ)" in err


def test_a_follower_whose_leader_dies_exits_with_an_error(small):
    from test_server import free_port, wait_healthy

    port = free_port()
    serve = ["serve", str(small), "--port", str(port), "--device", "cpu", "--kernels", "torch", "--max-batch", "1",
             "--max-seq-len", "64"]
    leader, follower = launch([serve, serve])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=120, process=leader)
        leader.kill()
        _, err = follower.communicate(timeout=30)
        assert follower.returncode == 1
        assert err.strip().splitlines()[-1].startswith("mistral: rank 1 of 2: lost the other ranks of the tensor-parallel group")
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()


# --- mistral bench under torchrun ------------------------------------------------------------------

BENCH = ["bench", "--preset", "small", "--device", "cpu", "--quick"]


def test_mistral_bench_under_torchrun_reports_rank_0s_figures(tmp_path):
    """Rank 0 measures and prints the table, the other rank follows its model calls; both exit 0."""
    out = tmp_path / "bench.json"
    run = torchrun("-m", "mistral.cli", *BENCH, "--json", str(out))
    assert run.stdout.count("# mistral bench: small") == 1, run.stdout  # rank 0's table only
    assert "tensor parallel over 2 ranks" in run.stdout.splitlines()[0]
    result = json.loads(out.read_text())
    assert result["meta"]["tensor_parallel"] == 2
    rows = {r["key"]: r for r in result["rows"]}
    for key in ("decode.b1.ctx128.torch", "decode.b1.ctx4096.torch", "engine.b1", "decode.b8.torch", "prefill.torch",
                "ttft", "tp.all_reduce", "tp.collectives_per_step"):
        assert rows[key]["value"] > 0 and rows[key]["label"] in run.stdout, rows[key]
    assert rows["tp.ranks"]["value"] == 2
    assert rows["decode.b1.ctx128.torch"]["unit"] == "tok/s"
    for r in rows.values():  # every figure measured, or a row saying why not
        assert r["value"] is not None or r["note"].startswith(("n/a (needs CUDA)", "skipped under tensor parallelism: ")), r


@pytest.mark.parametrize("ranks, flags, message", [
    (2, ["--steps", "0"], "mistral bench: error: --steps must be positive, got 0"),
    (3, [], "mistral bench: error: tensor parallelism over 3 ranks needs n_kv_heads (2) to be divisible by 3; "
            "this model splits over 1, 2 ranks"),
], ids=["bad-flag", "ranks-not-dividing-the-heads"])
def test_mistral_bench_under_tp_refuses_bad_input_on_every_rank_in_one_line(ranks, flags, message):
    """Every rank refuses before joining the group (so none waits for another): one line, status 2."""
    processes = launch([[*BENCH, *flags]] * ranks)
    for rank in processes:
        _, err = rank.communicate(timeout=60)
        assert (rank.returncode, err.strip()) == (2, message)


def test_each_ranks_random_part_is_a_part_of_one_model():
    """`mistral bench`'s random weights under TP: the replicated tensors alike on every rank, the
    split ones each rank's own slice (not copies of one another), of the part's shapes."""
    from mistral.make_random import random_model
    from mistral.tp import Shard, split_dim

    parts = [random_model(ARGS, "cpu", torch.float32, 16, shard=Shard(rank, 2)).state_dict() for rank in (0, 1)]
    for name, t in parts[0].items():
        if split_dim(name, t.dim()) is None:
            assert torch.equal(t, parts[1][name]), name
        else:
            assert not torch.equal(t, parts[1][name]), name
    part = parts[0]
    assert part["layers.0.attention.wk.weight"].shape == (ARGS.n_kv_heads // 2 * ARGS.head_dim, ARGS.dim)
    assert part["layers.0.feed_forward.w2.weight"].shape == (ARGS.dim, ARGS.hidden_dim // 2)
    assert part["output.weight"].shape == (ARGS.vocab_size // 2, ARGS.dim)
    assert part["tok_embeddings.weight"].shape == (ARGS.vocab_size, ARGS.dim)


def test_mistral_bench_ranks_given_other_flags_are_refused():
    ranks = launch([BENCH, [*BENCH, "--steps", "3"]])
    for rank in ranks:
        _, err = rank.communicate(timeout=60)
        assert (rank.returncode, err.strip()) == (2, "mistral bench: error: rank 1 was given other flags than rank 0 "
                                                     "(steps 3 against 4): every rank must run the same benchmark")


def test_mistral_bench_whose_follower_dies_stops_with_an_error(tmp_path):
    """Rank 1 killed while rank 0 measures: rank 0's next model call fails, and it exits, saying so."""
    leader, follower = launch([BENCH] * 2)
    try:
        for line in leader.stderr:  # rank 0's progress: the model is built and it is decoding
            if "ours, torch eager, context 128" in line:
                break
        else:
            raise AssertionError(f"rank 0 exited with {leader.wait()} before decoding")
        follower.kill()
        leader.wait(timeout=60)
        rest = leader.stderr.read()
        assert leader.returncode == 1, rest[-2000:]
        assert rest.strip().splitlines()[-1].startswith("mistral: rank 0 of 2: lost the other ranks of the tensor-parallel group")
        assert "# mistral bench" not in leader.stdout.read()
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()


def test_a_tensor_of_the_wrong_shape_is_named_with_its_full_shape(tmp_path):
    from mistral.errors import CheckpointError
    from mistral.tp import Shard

    folder = make_random(tmp_path / "c", preset("small"), "consolidated", "float32", tokenizer=False)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "hidden_dim": 1024}))  # the file holds 512
    with pytest.raises(CheckpointError, match=r"consolidated.safetensors: tensor 'layers.0.feed_forward.w1.weight' "
                                              r"has shape \[512, 256\], but the config implies \[1024, 256\]"):
        load_model(folder, shard=Shard(1, 2), quiet=True)

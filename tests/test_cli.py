"""The command line as a newcomer meets it: flags, defaults, and one clean line for each mistake."""

import argparse
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral import Mistral, MistralError
from mistral.args import ModelArgs
from mistral.cli import build_parser, demo_folder, main
from mistral.make_random import make_random
from mistral.progress import progress

ROOT = Path(__file__).resolve().parents[1]
# the real v3 tokenizer's vocabulary, at a width that decodes in milliseconds
TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, norm_eps=1e-5,
                 vocab_size=32768, rope_theta=1e6)
LOADING = ["logits", "inspect", "generate", "chat", "serve"]  # the commands that load weights


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """A folder holding the same tiny model in both formats, with the v3 tokenizer."""
    folder = tmp_path_factory.mktemp("both")
    make_random(folder, TINY, "consolidated", "float32", seed=1)
    make_random(folder, TINY, "hf", "float32", seed=1)
    return folder


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), err


def test_every_flag_has_help_with_its_default():
    for name, parser in subcommands().items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"mistral {name} {action.option_strings[0]}: no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in parser._get_formatter()._get_help_string(action), (name, action.dest)
        assert "(default: 8192)" in text or name not in ("generate", "chat", "serve")


def test_loading_commands_take_the_same_model_flags():
    flags = {name: {a.dest for a in p._actions} for name, p in subcommands().items() if name in LOADING}
    for name, dests in flags.items():
        assert {"weights", "format", "device", "dtype", "kernels"} <= dests, name
    for name in LOADING:
        extra = ["--tokens", "1", "--out", "x"] if name in ("logits", "inspect") else ["--prompt", "x"]
        extra = [] if name in ("chat", "serve") else extra
        a = build_parser().parse_args([name, "w", "--format", "hf", *extra])
        assert a.format == "hf"


def test_version_and_verbose_on_either_side(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("mistral-from-scratch 0.")
    parse = build_parser().parse_args
    assert parse(["-v", "describe", "small"]).verbose and parse(["describe", "small", "-v"]).verbose
    assert not parse(["describe", "small"]).verbose


def test_one_temperature_default_and_a_capped_answer():
    import dataclasses

    from mistral.protocol import ChatCompletionRequest

    a = build_parser().parse_args(["generate", "w", "--prompt", "x"])
    api_default = {f.name: f.default for f in dataclasses.fields(ChatCompletionRequest)}["temperature"]
    assert a.temperature == api_default == 1.0
    assert a.max_tokens == 512
    from mistral.cli import sampling_settings

    assert sampling_settings(build_parser().parse_args(["generate", "w", "--prompt", "x", "--max-tokens", "0"]))["max_tokens"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:1"])
@pytest.mark.parametrize("command", ["generate", "chat", "logits", "inspect", "serve"])
def test_a_device_that_is_not_here_is_one_line(both, command, device, capsys):
    extra = {"generate": ["--prompt", "Hi"], "logits": ["--tokens", "1,2", "--out", "x.safetensors"],
             "inspect": ["--prompt", "Hi", "--out", "x"]}.get(command, [])
    assert main([command, str(both), "--device", device, *extra]) == 2
    one_error_line(capsys.readouterr().err, f"device {device!r}", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_python_api_device_that_is_not_here(both):
    with pytest.raises(MistralError, match="device 'cuda'"):
        Mistral.from_pretrained(both, device="cuda")


@pytest.mark.parametrize("argv", [["logits", "--tokens", "1 3 4", "--out", "x.safetensors"],
                                  ["logits", "--tokens", "1,,4", "--out", "x.safetensors"],
                                  ["inspect", "--tokens", "1 3", "--out", "x"],
                                  ["inspect", "--prompt", "Hi", "--layers", "0 1", "--out", "x"]])
def test_space_separated_ids_are_refused(both, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([argv[0], str(both), *argv[1:]]) == 2
    one_error_line(capsys.readouterr().err, "comma-separated" if "--tokens" in argv else "not an index")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_describe_seq_lens_are_comma_separated(capsys):
    assert main(["describe", "small", "--seq-lens", "512 4096"]) == 2
    one_error_line(capsys.readouterr().err, "--seq-lens", "comma-separated")


def test_generate_reads_the_hf_copy_when_asked(both, capsys):
    argv = ["generate", str(both), "--prompt", "Hi", "--max-tokens", "3", "--temperature", "0", "--max-seq-len", "64"]
    assert main([*argv, "--format", "hf"]) == 0
    via_hf = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == via_hf  # the same weights in either format: the same greedy answer


def test_the_default_cap_bounds_an_answer_by_what_the_context_leaves(both, capsys):
    """The CLI's default --max-tokens (512) is a cap, not a request: with a 64-position context the
    answer runs to the end of the context (the API refuses a max_tokens past it, as OpenAI does)."""
    from mistral.cli import sampling_settings

    assert main(["generate", str(both), "--prompt", "Hi", "--temperature", "0", "--max-seq-len", "64"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(both), "--raw", "--prompt", "Hi", "--temperature", "0", "--max-seq-len", "64"]) == 0
    assert capsys.readouterr().out.strip()

    class Context:
        max_seq_len = 64

    a = build_parser().parse_args(["generate", "w", "--prompt", "x"])
    assert sampling_settings(a, Context(), 10)["max_tokens"] == 54
    assert sampling_settings(build_parser().parse_args(["generate", "w", "--prompt", "x", "--max-tokens", "20"]), Context(), 10)["max_tokens"] == 20


def test_a_missing_local_folder_is_not_a_hub_problem(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the same answer without a network
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert main(["generate", "weights/Mistral-7B-Instruct-v0.3", "--prompt", "Hi"]) == 2
    one_error_line(capsys.readouterr().err, "no such folder",
                   "mistral download mistralai/Mistral-7B-Instruct-v0.3 --dir weights/Mistral-7B-Instruct-v0.3")


def test_download_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "mistralai/Mistral-7B-Instruct-v0.3", "--dir", str(tmp_path / "w")]) == 2
    one_error_line(capsys.readouterr().err, "HF_HUB_OFFLINE")


def serve(argv: list[str], port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral.cli", "serve", *argv, "--port", str(port)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_serve_port_in_use_is_one_line_before_listening(both):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve([str(both)], port)
    assert run.returncode == 2
    one_error_line(run.stderr, f"--port {port}", "already in use")


def test_serve_checks_the_weights_before_listening(tmp_path):
    run = serve([str(tmp_path / "missing")], 0)
    assert run.returncode == 2
    one_error_line(run.stderr, "no such folder")


def test_demo_outside_the_checkout_uses_a_cache_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert demo_folder() == Path("weights/demo-small")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert demo_folder() == tmp_path / "cache" / "mistral-from-scratch" / "demo-small"


def test_inspect_without_matplotlib_writes_nothing(both, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "out"
    assert main(["inspect", str(both), "--prompt", "Hi", "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "pip install matplotlib")
    assert not out.exists()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_only(tmp_path, monkeypatch):
    assert progress(total=3, desc="x", unit="tensor").disable  # pytest's captured stderr is no terminal
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    make_random(tmp_path / "r", TINY, "consolidated", "float32", tokenizer=False)
    from mistral.loader import load_model

    load_model(tmp_path / "r")
    shown = terminal.getvalue()
    n = 2 + 9 * TINY.n_layers + 1
    assert "writing r: 100%" in shown and "loading r: 100%" in shown and f"{n}/{n}" in shown


def test_validate_logits_example_on_a_mistral_format_folder(tmp_path):
    folder = make_random(tmp_path / "c", TINY, "consolidated", "float32", seed=2, tokenizer=False)
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "validate_logits.py"), str(folder)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    err = float(run.stdout.split("max |logit| = ")[1].split()[0])
    assert err <= 1e-5 and "argmax agrees at every position: True" in run.stdout

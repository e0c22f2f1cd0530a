"""Hand-written CPU kernels for the few rows of a decode step: mat-vecs over fp32, bf16, int8 and int4
weights, and attention.

    int8_matvec(x, weight, scales)              weight [N, K] int8, scales [N]: W = weight * scales[:, None]
    int4_matvec(x, weight, scales, group_size)  weight [N, K/2] uint8, two 4-bit weights a byte (input 2j
                                                in the low nibble of byte j), scales [N, K/group_size]:
                                                W[n, k] = (nibble - 8) * scales[n, k // group_size]
    matvec(x, weight)                           fp32 / bf16 weight [N, K]
    decode_attention(q, k, v, pos, window, block_table=None)
                                                a decode step's causal GQA over cached keys and
                                                values, contiguous or a paged pool read in place

For the mat-vecs, x [..., K] is fp32 or bf16 (K a multiple of 32); the result [..., N] is in x's
dtype. For int8 / int4 weights, as llama.cpp's q8_0 / q4_0 dot products do, x is quantized to int8
per block of 32 inputs with one fp32 scale each (max |x| / 127, round half to even), and each
block's products are summed exactly in int32: the only error beyond fp32 rounding is that of x's
quantization, at most half a step per input, so |y - x Wᵀ| <= Σ_k |W[n, k]| · max|x over k's block| / 254.

The C++ (quant_matvec.cpp: AVX-512 VNNI, AVX2 and portable paths, chosen by the compiler's target;
float_matvec.cpp, decode_attention.cpp; ops.cpp: the PyTorch operators `torch.ops.mistral_cpu.*`)
is compiled on first use by the system C++ compiler (`$CXX`, else `c++`) with -O3 -march=native,
into a cache folder keyed by the sources, the compiler, torch and this CPU
(`$MISTRAL_CPU_KERNELS_CACHE`, else ~/.cache/mistral-from-scratch/cpu-kernels; ~15 s once), and
loaded as an operator library: torch.compile sees each call as one opaque op.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = ("quant_matvec.cpp", "float_matvec.cpp", "decode_attention.cpp", "ops.cpp")
HEADERS = ("quant_matvec.h", "float_matvec.h", "decode_attention.h", "bf16.h")
FLAGS = ("-O3", "-march=native", "-std=c++20", "-fPIC", "-shared", "-fopenmp")
BLOCK = 32  # inputs per activation scale

_state: dict[str, object] = {}  # "library": its path once loaded; "error": why it could not be


class Unavailable(RuntimeError):
    """The kernels could not be built or loaded here (the message says why, in one line)."""


def load() -> Path:
    """Build (once per machine) and load the operator library; its path. Raises Unavailable, with
    the same message on every later call (no second attempt in a process)."""
    if "library" in _state:
        return _state["library"]
    if "error" in _state:
        raise Unavailable(_state["error"])
    try:
        path = _build()
        torch.ops.load_library(str(path))
        _register_fakes()
    except Unavailable as e:
        _state["error"] = str(e)
        raise
    except OSError as e:
        _state["error"] = f"cannot load the CPU kernels: {e}"
        raise Unavailable(_state["error"]) from None
    _state["library"] = path
    return path


def isa() -> str:
    """The instruction set the loaded kernels were compiled for: avx512-vnni, avx2 or scalar."""
    load()
    return torch.ops.mistral_cpu.isa()


def int8_matvec(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if "library" not in _state:
        load()
    return torch.ops.mistral_cpu.int8_matvec(x, weight, scales)


def int4_matvec(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    if "library" not in _state:
        load()
    return torch.ops.mistral_cpu.int4_matvec(x, weight, scales, group_size)


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if "library" not in _state:
        load()
    return torch.ops.mistral_cpu.matvec(x, weight)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int,
                     block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA of q [B, T, H, D] over cached keys and values; row b's token t at position pos[b] + t
    sees keys j with pos - window < j <= pos (window 0: all before it); [B, T, H, D] in q's dtype.
    k, v are [B, Hkv, L, D] (any strides, D contiguous), or with `block_table` [B, n] (int64) a paged
    pool [num_blocks, block_size, Hkv, D] where row b's position j sits in block
    block_table[b, j // block_size], slot j % block_size, read in place."""
    if "library" not in _state:
        load()
    return torch.ops.mistral_cpu.decode_attention(q, k, v, pos, window, block_table)


# --- building ------------------------------------------------------------------------------------


def cache_folder() -> Path:
    if os.environ.get("MISTRAL_CPU_KERNELS_CACHE"):
        return Path(os.environ["MISTRAL_CPU_KERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mistral-from-scratch" / "cpu-kernels"


def compiler() -> str:
    """The C++ compiler's path; Unavailable when there is none."""
    cxx = os.environ.get("CXX") or "c++"
    found = shutil.which(cxx)
    if found is None:
        raise Unavailable(f"no C++ compiler: {cxx!r} is not on PATH (set CXX to one)")
    return found


def compile_command(cxx: str, sources: list[Path], out: Path, flags=FLAGS, torch_headers: bool = True) -> list[str]:
    """The compiler's command line: the kernels alone (torch_headers=False, what tests build for
    other instruction sets) or with the PyTorch operators."""
    cmd = [cxx, *flags, *map(str, sources), "-o", str(out)]
    if torch_headers:
        from torch.utils.cpp_extension import include_paths, library_paths

        lib = library_paths()[0]
        cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                *(f"-I{p}" for p in include_paths()), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    return cmd


def _build() -> Path:
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        key.update((HERE / name).read_bytes())
    for part in (cxx, version, torch.__version__, " ".join(FLAGS), _cpu_flags()):
        key.update(part.encode())
    folder = cache_folder()
    target = folder / f"mistral_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.partial")
        os.close(fd)
    except OSError as e:
        raise Unavailable(f"cannot write the CPU kernels' cache folder {folder}: {e}") from None
    cmd = compile_command(cxx, [HERE / s for s in SOURCES], Path(tmp))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        errors = [line for line in res.stderr.splitlines() if "error" in line] or res.stderr.splitlines()[-1:]
        raise Unavailable(f"compiling the CPU kernels failed ({Path(cxx).name} exit status {res.returncode}): "
                          f"{errors[0].strip() if errors else 'no message'}")
    os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    return target


def _cpu_flags() -> str:
    """What -march=native depends on: a cache folder shared by different machines keeps one build each."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing: the ops are opaque, their output [..., N] in x's dtype."""

    @torch.library.register_fake("mistral_cpu::int8_matvec")
    def _(x, weight, scales):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mistral_cpu::int4_matvec")
    def _(x, weight, scales, group_size):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mistral_cpu::matvec")
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mistral_cpu::decode_attention")
    def _(q, k, v, pos, window, block_table=None):
        return torch.empty_like(q)

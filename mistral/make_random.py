"""Write a random-weight checkpoint of any Mistral shape, in either on-disk format.

The real weights can't be downloaded on every machine, so tests, the demo and the benchmarks use
these. Tensors are generated and written one at a time, so a full-size 7B (14.5 GB in bf16) is
written with about one tensor's worth of memory. Both formats written from the same seed hold the
same model: the Hugging Face one gets its q/k rows permuted exactly as the official conversion does.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from .args import ModelArgs, preset
from .formats import CONSOLIDATED, DTYPES, HF, as_dtype, dtype_name
from .loader import mistral_to_hf_name, tensor_shapes, to_hf_layout
from .model import Transformer
from .ops import get_ops
from .progress import progress

def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """The random weights of every checkpoint made here, fp32 on the generator's device: N(0, std²)
    matrices, and norm weights near one, but not one, so that a forgotten norm weight shows."""
    t = torch.randn(shape, generator=gen, device=gen.device)
    return 1.0 + 0.1 * t if name.endswith("norm.weight") else std * t


def random_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype, max_seq_len: int,
                 seed: int = 0, kernels: str = "torch", shard=None) -> Transformer:
    """The model with random weights made directly on `device` (for a benchmark that should not
    write 14.5 GB first): the weights of `random_tensor`, from a generator on that device.

    shard: a `tp.Shard`, to make only one rank's part of a tensor-parallel model. The replicated
    tensors (norms, embedding) come from a generator every rank seeds alike, so that they are the
    same on every rank; each rank's slices from one of its own: together, the parts of one model."""
    from . import tp

    with torch.device("meta"):
        model = Transformer(args, max_seq_len=max_seq_len)
    if shard is not None:
        shard.apply(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    own = torch.Generator(device=device).manual_seed(seed + 1 + shard.rank) if shard is not None else gen
    state = {name: random_tensor(name, tuple(p.shape), gen if tp.split_dim(name, p.dim()) is None else own).to(dtype)
             for name, p in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.init_freqs(device)
    return model.use_ops(get_ops(kernels, device)).eval()


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make) -> None:
    """Write a safetensors file whose tensors come from `make(name)`, one at a time.

    The format: 8 bytes little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets: [begin, end]}} padded with spaces to 8 bytes, then the data.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPES[dtype_name(dtype)].safetensors, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            t = make(name).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            f.write(memoryview(t.view(torch.uint8).numpy()))
    tmp.replace(path)  # a crash mid-write leaves no file that looks complete


def v3_tokenizer_file() -> Path | None:
    """The real v3 tokenizer that ships inside mistral-common, if that package is installed."""
    try:
        import mistral_common
    except ImportError:
        return None
    path = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    return path if path.is_file() else None


def make_random(
    out_dir: str | Path,
    args: ModelArgs,
    fmt: str = CONSOLIDATED,
    dtype: torch.dtype | str = torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
    shard_bytes: int = 5 * 2**30,
    tokenizer: bool = True,
    quiet: bool = False,
) -> Path:
    """Write a random checkpoint to out_dir; returns the folder. Same seed, same model in both formats.
    A progress bar shows on a terminal unless `quiet`."""
    if fmt not in (CONSOLIDATED, HF):
        raise ValueError(f"format must be {CONSOLIDATED!r} or {HF!r}, got {fmt!r}")
    dtype = as_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(args)
    gen = torch.Generator().manual_seed(seed)
    bar = progress(total=len(shapes), desc=f"writing {out.name}", unit="tensor", quiet=quiet)

    def make(name: str) -> torch.Tensor:
        bar.update(1)
        return random_tensor(name, shapes[name], gen, std)

    if fmt == CONSOLIDATED:
        (out / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
        write_safetensors(out / "consolidated.safetensors", shapes, dtype, make)
    else:
        (out / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")

        def make_hf(hf_name: str) -> torch.Tensor:
            name = hf_names[hf_name]
            return to_hf_layout(name, make(name), args)

        hf_names = {mistral_to_hf_name(n): n for n in shapes}
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[dict[str, tuple[int, ...]]] = [{}]
        size = 0
        for name, shape in shapes.items():
            nbytes = itemsize * int(torch.Size(shape).numel())
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][mistral_to_hf_name(name)] = shape
            size += nbytes
        if len(shards) == 1:
            write_safetensors(out / "model.safetensors", shards[0], dtype, make_hf)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(out / file, shard, dtype, make_hf)
                weight_map.update({name: file for name in shard})
            total = sum(itemsize * int(torch.Size(s).numel()) for s in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    bar.close()
    source = v3_tokenizer_file() if tokenizer else None
    if source is not None:
        shutil.copyfile(source, out / "tokenizer.model.v3")
    return out


def random_checkpoints(cache: str | Path, preset_name: str, seed: int = 0,
                       formats: tuple[str, ...] = (CONSOLIDATED, HF)) -> tuple[Path, ...]:
    """One random fp32 model of a preset in each format, `{cache}/{preset}-consolidated` and
    `{cache}/{preset}-hf` (the same seed: the same model), each written only if not already there:
    what the benchmarks run ours and a peer (transformers, llama.cpp) on. One folder per format."""
    markers = {CONSOLIDATED: "consolidated.safetensors", HF: "model.safetensors"}
    folders = []
    for fmt in formats:
        folder = Path(cache) / f"{preset_name}-{fmt}"
        if not (folder / markers[fmt]).exists():
            make_random(folder, preset(preset_name), fmt=fmt, dtype=torch.float32, seed=seed)
        folders.append(folder)
    return tuple(folders)

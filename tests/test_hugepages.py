"""mistral/hugepages.py: the loader's move of CPU weights into 2 MiB pages keeps every tensor's
values, identity and sharing, and leaves tensors that map the checkpoint file alone."""

import re

import pytest
import torch

from mistral import hugepages
from mistral.args import ModelArgs
from mistral.loader import load_model
from mistral.make_random import make_random
from mistral.merged import merge_projections

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                 norm_eps=1e-5, vocab_size=256, rope_theta=1e6)
TOKENS = torch.tensor([[1, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random(tmp_path_factory.mktemp("w") / "m", ARGS, "consolidated", "float32", seed=5, tokenizer=False,
                       quiet=True)


@pytest.fixture
def every_storage(monkeypatch):
    """Move every storage, however small (the test model's are all under MIN_BYTES)."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)


def mapping_field(ptr: int, field: str) -> int | None:
    """A field of /proc/self/smaps (AnonHugePages, THPeligible, ...) for the mapping holding ptr."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m.group(1), 16) <= ptr < int(m.group(2), 16)
            elif inside and line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def tensors(model):
    return {name: t for name, t in (*model.named_parameters(), *model.named_buffers())}


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_moved_tensors_keep_their_values_identity_and_shared_storage(folder, every_storage, monkeypatch, quantize):
    moved_by_loader = load_model(folder, quantize=quantize, quiet=True)
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1 << 62)
    model = load_model(folder, quantize=quantize, quiet=True)  # where the allocator put it
    merge_projections(model)  # the parts keep views of the merged rows
    before = {name: t.clone() for name, t in tensors(model).items()}
    identity = {name: id(t) for name, t in tensors(model).items()}
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    assert (hugepages.to_huge_pages(model) > 0) == hugepages.available()

    after = tensors(model)
    assert {name: id(t) for name, t in after.items()} == identity  # the same tensor objects, changed in place
    for name, t in after.items():
        assert torch.equal(t, before[name]), name
    attention = model.layers[0].attention
    merged = attention.merged_project_qkv.linear.weight
    assert attention.wq.weight.untyped_storage().data_ptr() == merged.untyped_storage().data_ptr()
    assert attention.wk.weight.data_ptr() == merged.data_ptr() + attention.wq.weight.nbytes
    with torch.no_grad():
        assert torch.equal(model(TOKENS), moved_by_loader(TOKENS))


def test_tensors_that_map_the_checkpoint_file_stay_mapped(folder, every_storage):
    model = load_model(folder, dtype="float32", quiet=True)  # the file's own dtype: parameters map the file
    ptrs = {name: t.data_ptr() for name, t in tensors(model).items()}
    assert hugepages.to_huge_pages(model) == 0  # the file's tensors stay; the rotary tables moved at loading
    assert {name: t.data_ptr() for name, t in tensors(model).items()} == ptrs
    weight = model.layers[0].attention.wq.weight
    assert any(lo <= weight.data_ptr() < hi for lo, hi in hugepages._file_mappings())


def test_a_converted_load_lands_in_an_advised_region(folder, every_storage):
    model = load_model(folder, dtype="bfloat16", quiet=True)  # converted: new storages, which the loader moves
    reference = load_model(folder, dtype="float32", quiet=True)
    w = model.layers[0].feed_forward.w1.weight
    assert torch.equal(w, reference.layers[0].feed_forward.w1.weight.bfloat16())
    # madvise(MADV_HUGEPAGE) on the region makes it eligible; whether the kernel then finds free
    # 2 MiB pages for it is the kernel's business
    assert mapping_field(w.data_ptr(), "THPeligible") == int(hugepages.available())


def test_nothing_moves_without_transparent_huge_pages(folder, every_storage, monkeypatch, tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP_MODE", mode)
    assert not hugepages.available()
    model = load_model(folder, quantize="int8", quiet=True)
    ptrs = {name: t.data_ptr() for name, t in tensors(model).items()}
    assert hugepages.to_huge_pages(model) == 0
    assert {name: t.data_ptr() for name, t in tensors(model).items()} == ptrs


def test_a_mapping_the_system_refuses_leaves_every_tensor_in_place(folder, every_storage, monkeypatch):
    """Under strict overcommit the region's mmap can fail: loading goes on, the tensors where they were."""
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages.mmap, "mmap", refuse)
    model = load_model(folder, quantize="int4", quiet=True)
    reference_ptrs = {name: t.data_ptr() for name, t in tensors(model).items()}
    assert hugepages.to_huge_pages(model) == 0
    assert {name: t.data_ptr() for name, t in tensors(model).items()} == reference_ptrs
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS)).all()

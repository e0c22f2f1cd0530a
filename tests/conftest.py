"""Test setup shared by every test file.

Triton's interpreter must be switched on before `triton` is first imported: on a machine without a
CUDA GPU every Triton kernel then runs on CPU tensors (slowly, so kernel tests keep shapes small).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

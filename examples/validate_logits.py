"""Validate our logits against transformers' MistralForCausalLM on a checkpoint folder.

    python examples/validate_logits.py WEIGHTS_DIR [--tokens 1,3,1000,4] [--dtype float32]

Loads the folder twice — with our loader and with `transformers` — runs the same tokens through
both, and prints the largest difference relative to the largest logit. In fp32 the two agree to
about 1e-6; our tests require <= 1e-5.

transformers reads only the Hugging Face format (config.json + model*.safetensors). A folder in
Mistral's format alone (`mistral demo`'s, or `mistral download`'s default) is converted into a
temporary HF copy first, with our own q/k row permutation: the comparison then checks the model's
arithmetic, not that permutation (tests/test_loader.py checks it against the official layout).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MistralForCausalLM

from mistral import MistralError
from mistral.cli import parse_int_list
from mistral.loader import CONSOLIDATED, HF, find_checkpoint, load_model, mistral_to_hf_name, permute_for_hf

parser = argparse.ArgumentParser()
parser.add_argument("weights")
parser.add_argument("--tokens", default="1,3,1027,1032,1049,1115,29473,4")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--device", default="cpu")
args = parser.parse_args()


def hf_copy(model, folder: Path) -> Path:
    """Write `model` in the Hugging Face format to `folder`."""
    a = model.args
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            tensor = permute_for_hf(tensor, a.n_heads if name.endswith("wq.weight") else a.n_kv_heads)
        state[mistral_to_hf_name(name)] = tensor.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(a.to_hf_config()))
    return folder


try:
    dtype = getattr(torch, args.dtype)
    tokens = torch.tensor([parse_int_list(args.tokens, "--tokens")], device=args.device)
    find_checkpoint(args.weights)  # a clear error for a folder without a checkpoint
    try:
        has_hf = find_checkpoint(args.weights, HF).format == HF
    except MistralError:  # Mistral's format only
        has_hf = False
    ours = load_model(args.weights, device=args.device, dtype=dtype, prefer=HF if has_hf else CONSOLIDATED)
except MistralError as e:
    sys.exit(f"validate_logits: error: {e}")

with tempfile.TemporaryDirectory() as tmp:
    source = args.weights
    if not has_hf:
        print(f"{args.weights} has no Hugging Face copy: transformers reads a temporary one converted from it")
        source = hf_copy(ours, Path(tmp))
    theirs = MistralForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager").to(args.device).eval()
    with torch.inference_mode():
        a = ours(tokens).float()
        b = theirs(tokens).logits.float()
err = ((a - b).abs().max() / b.abs().max()).item()
print(f"{tokens.shape[1]} tokens, {args.dtype}: max |ours - transformers| / max |logit| = {err:.3e}")
print("argmax agrees at every position:", bool((a.argmax(-1) == b.argmax(-1)).all()))

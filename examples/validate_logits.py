"""Validate our logits against transformers' MistralForCausalLM on a checkpoint folder.

    python examples/validate_logits.py WEIGHTS_DIR [--tokens 1,3,1000,4] [--dtype float32]

Loads the folder twice — with our loader and with `transformers` (which needs the Hugging Face
format: config.json + model*.safetensors; `mistral make-random DIR --format hf` writes one) — runs
the same tokens through both, and prints the largest difference relative to the largest logit.
In fp32 the two agree to about 1e-6; our tests require <= 1e-5.
"""

import argparse

import torch
from transformers import MistralForCausalLM

from mistral.loader import load_model

parser = argparse.ArgumentParser()
parser.add_argument("weights")
parser.add_argument("--tokens", default="1,3,1027,1032,1049,1115,29473,4")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

dtype = getattr(torch, args.dtype)
tokens = torch.tensor([[int(t) for t in args.tokens.split(",")]], device=args.device)

ours = load_model(args.weights, device=args.device, dtype=dtype, prefer="hf")
theirs = MistralForCausalLM.from_pretrained(args.weights, dtype=dtype, attn_implementation="eager").to(args.device).eval()

with torch.inference_mode():
    a = ours(tokens).float()
    b = theirs(tokens).logits.float()
err = ((a - b).abs().max() / b.abs().max()).item()
print(f"{tokens.shape[1]} tokens, {args.dtype}: max |ours - transformers| / max |logit| = {err:.3e}")
print("argmax agrees at every position:", bool((a.argmax(-1) == b.argmax(-1)).all()))

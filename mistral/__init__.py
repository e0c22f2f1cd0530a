"""Mistral-7B-Instruct-v0.3 from scratch in PyTorch.

    from mistral import Mistral
    llm = Mistral.from_pretrained("weights/Mistral-7B-Instruct-v0.3")
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi!"}])

Where things are: the model in `model.py`, its hyper-parameters in `args.py`, checkpoint loading in
`loader.py`, the tokenizer in `tokenizer.py`, the v3 prompt format in `prompt.py`, the batching
engine in `engine.py`, sampling in `sampling.py`, the OpenAI-shaped API in `generate.py`, the HTTP
server in `server.py`; the Triton kernels live in the top-level package `kernels`.
"""

from .args import PRESETS, ModelArgs, preset
from .errors import CheckpointError, MistralError, RequestError, TokenizerError

__version__ = "0.1.0"
__all__ = ["Mistral", "ModelArgs", "PRESETS", "preset", "MistralError", "CheckpointError", "RequestError",
           "TokenizerError", "Transformer", "load_model"]


def __getattr__(name: str):
    # Imported on first use, so that `import mistral` stays cheap for the CLI.
    if name == "Mistral":
        from .generate import Mistral

        return Mistral
    if name == "Transformer":
        from .model import Transformer

        return Transformer
    if name == "load_model":
        from .loader import load_model

        return load_model
    raise AttributeError(f"module 'mistral' has no attribute {name!r}")

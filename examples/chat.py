"""The reference page's Python example, against our generator instead of an HTTP API.

    python examples/chat.py WEIGHTS_DIR [--no-stream]

The provider's example calls `client.chat.completions.create(...)` and reads `chunk.choices[0].delta`
(streamed) or `choices[0].message` (not streamed). `Mistral.create_chat_completion` takes the same
parameters and returns the same objects, as plain dicts. (With random weights the text is nonsense;
`mistral demo` makes such a checkpoint.)
"""

import argparse

from mistral import Mistral

parser = argparse.ArgumentParser()
parser.add_argument("weights", nargs="?", default="weights/demo-small")
parser.add_argument("--no-stream", action="store_true")
args = parser.parse_args()

llm = Mistral.from_pretrained(args.weights)
stream = not args.no_stream
max_tokens = 512

chat_completion_res = llm.create_chat_completion(
    messages=[
        {"role": "system", "content": "Act like you are a helpful assistant."},
        {"role": "user", "content": "Hi there!"},
    ],
    stream=stream,
    max_tokens=max_tokens,
)

if stream:
    for chunk in chat_completion_res:
        print(chunk["choices"][0]["delta"].get("content") or "", end="", flush=True)
    print()
else:
    print(chat_completion_res["choices"][0]["message"]["content"])

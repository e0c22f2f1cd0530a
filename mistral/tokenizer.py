"""The v3 SentencePiece tokenizer of Mistral-7B-Instruct-v0.3, and a streaming detokenizer.

The model file holds 32768 pieces: 750 control tokens (`<s>`, `</s>`, `[INST]`, `[/INST]`,
`[TOOL_CALLS]`, ... then `[control_N]` fillers), 256 byte-fallback pieces `<0x00>`..`<0xFF>` for
characters outside the vocabulary, and ordinary pieces where `▁` stands for a space. The control
ids are read from the file by name, never assumed, so a wrong file fails here instead of
silently producing a prompt the model was never trained on.

Decoding follows SentencePiece exactly (we call it): control tokens decode to nothing, a run of
byte pieces is decoded as UTF-8 with one U+FFFD per invalid byte, and the `▁` that starts the
first visible piece is dropped (it is the "dummy prefix" space the encoder added).
"""

from __future__ import annotations

import functools
import operator
import os
from pathlib import Path

import sentencepiece

from .errors import RequestError, TokenizerError

# Files looked for, in order, when from_path is given a weights folder.
TOKENIZER_FILES = ("tokenizer.model.v3", "tokenizer.model")

# The control tokens the v3 instruct format is written with: attribute name -> piece.
V3_CONTROL_PIECES = {
    "bos_id": "<s>",
    "eos_id": "</s>",
    "inst_id": "[INST]",
    "inst_end_id": "[/INST]",
    "tool_calls_id": "[TOOL_CALLS]",
    "available_tools_id": "[AVAILABLE_TOOLS]",
    "available_tools_end_id": "[/AVAILABLE_TOOLS]",
    "tool_results_id": "[TOOL_RESULTS]",
    "tool_results_end_id": "[/TOOL_RESULTS]",
}

# Control pieces that only later formats (v7+: system prompt in its own block) carry: a file with
# them belongs to another model, whose prompts this module would build wrongly.
LATER_FORMAT_PIECES = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


class Tokenizer:
    """SentencePiece encode/decode plus the ids of the v3 control tokens, read from the file."""

    bos_id: int
    eos_id: int
    inst_id: int
    inst_end_id: int
    tool_calls_id: int
    available_tools_id: int
    available_tools_end_id: int
    tool_results_id: int
    tool_results_end_id: int

    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self._control = frozenset(i for i in range(self.vocab_size) if sp.IsControl(i))
        # Byte-fallback pieces `<0xAB>` -> the byte they stand for.
        self.byte_value: dict[int, int] = {
            i: int(sp.id_to_piece(i)[3:5], 16) for i in range(self.vocab_size) if sp.IsByte(i)
        }

        for attr, piece in V3_CONTROL_PIECES.items():
            token_id = sp.piece_to_id(piece)  # unknown pieces map to <unk>, which is not a control
            if token_id not in self._control:
                raise TokenizerError(
                    f"{self.path}: not a v3 tokenizer: it has no control token {piece} "
                    "(Mistral-7B-Instruct-v0.3 needs tokenizer.model.v3)"
                )
            setattr(self, attr, token_id)
        later = [p for p in LATER_FORMAT_PIECES if sp.piece_to_id(p) in self._control]
        if later:
            raise TokenizerError(
                f"{self.path}: not a v3 tokenizer: it has the control tokens {', '.join(later)} of a later "
                "instruct format (v7 or newer)"
            )
        if len(self.byte_value) != 256:
            raise TokenizerError(f"{self.path}: not a v3 tokenizer: it has {len(self.byte_value)} byte pieces, not 256")

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> Tokenizer:
        """A weights folder (tokenizer.model.v3, else tokenizer.model) or a tokenizer file."""
        path = Path(path)
        if path.is_dir():
            for name in TOKENIZER_FILES:
                if (path / name).is_file():
                    return cls(path / name)
            raise TokenizerError(f"{path}: no tokenizer in this folder (looked for {' or '.join(TOKENIZER_FILES)})")
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file or weights folder")
        # mistral-common names its files *.model.v1, .v2, .v3, .v7...: a version in the name is a
        # promise about the format, so a file that says it is another version is refused outright.
        suffix = path.name.rsplit(".", 1)[-1]
        if ".model." in path.name and suffix.startswith("v") and suffix.split("m")[0] != "v3":
            raise TokenizerError(f"{path}: a {suffix} tokenizer file; Mistral-7B-Instruct-v0.3 needs a v3 one")
        return cls(path)

    # --- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. Control tokens are never produced from text: "[INST]" encodes as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            ids = self._sp.encode(text)
        except RuntimeError:  # pybind11's "Unable to cast ... to C++ type": a str that isn't valid UTF-8
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"the text holds a lone surrogate ({ascii(text[e.start])[1:-1]} at index {e.start}), "
                                   "which is not valid Unicode") from None
            raise
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, exactly as SentencePiece decodes them (control tokens give nothing)."""
        return self._sp.decode(self._as_ids(ids))

    @functools.cached_property
    def anchor(self) -> tuple[int, str]:
        """An ordinary piece that decodes to itself without a leading space ("a"), and its text:
        what the streaming detokenizer decodes behind (see StreamingDetokenizer)."""
        for i in [self.piece_to_id("a"), *range(self.vocab_size)]:
            if i is None or self.is_control(i) or self.is_byte(i):
                continue
            piece = self.id_to_piece(i)
            if not piece.startswith("▁") and self.decode([i]) == piece:  # <unk> decodes to " ⁇ "
                return i, piece
        raise TokenizerError(f"{self.path}: no ordinary piece without a leading ▁")

    def is_control(self, token_id: int) -> bool:
        return token_id in self._control

    def is_byte(self, token_id: int) -> bool:
        return token_id in self.byte_value

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._as_ids([token_id])[0])

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece, or None if the vocabulary has no such piece."""
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None

    def _as_ids(self, ids) -> list[int]:
        """Plain ints (numpy and torch integers accepted), each checked to be in the vocabulary."""
        out = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise ValueError(f"token ids must be integers, got {i!r}") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(i)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# --- streaming --------------------------------------------------------------------------------------


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of `data` could still become one character with more bytes.

    Only the last lead byte can start such a tail: a lead byte is never a continuation byte, so
    whatever SentencePiece decided about the bytes before it cannot depend on what follows.
    Erring long is safe (text is only held back a little longer), so overlong or surrogate
    prefixes, which SentencePiece will reject, are held like any other.
    """
    for back in range(1, min(len(data), 3) + 1):
        b = data[-back]
        if 0x80 <= b <= 0xBF:  # continuation byte: keep looking for its lead
            continue
        need = 2 if 0xC0 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF7 else 1
        return back if back < need else 0
    return 0


class StreamingDetokenizer:
    """Turns generated ids into text deltas, one token at a time, and cuts at stop strings.

    Guarantees (tested against SentencePiece's own decode):
    - the deltas, concatenated (with `finish()`), equal `tokenizer.decode(all ids)`;
    - a character split across byte-fallback pieces is emitted whole once its last byte arrives,
      never as U+FFFD halves;
    - text that could be the start of a stop string is held back until decided; once a stop string
      is complete, the text before it has been emitted, the stop string is cut and `stopped` is set.
      The stop is the first one to be complete in the text; if several end at the same character,
      the output is cut at the start of the longest.

    How: a piece's text depends only on whether visible text came before it (the `▁` it starts
    with is dropped at the very beginning), except that a run of byte pieces is decoded together.
    So each id is decoded as soon as it arrives, behind an anchor piece (a piece with no `▁` and
    known text) that tells SentencePiece visible text came before, unless none has; only the last
    few bytes of an unfinished UTF-8 character wait for the bytes that complete them.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] | None = ()):
        self.tokenizer = tokenizer
        self.stop: tuple[str, ...] = tuple(check_stop_strings(stop))
        self.stopped = False
        self._pending: list[int] = []  # byte pieces of a character not finished yet (at most 3)
        self._at_start = True  # only control tokens so far: the next `▁` is the dummy prefix
        self._held = ""  # text that could begin a stop string
        self._anchor_id, self._anchor_text = tokenizer.anchor

    def push(self, token_id: int) -> str:
        """Feed one generated id; returns the text that can be emitted now ("" if held back)."""
        if self.stopped:
            return ""
        tok = self.tokenizer
        (token_id,) = tok._as_ids([token_id])
        ids = [*self._pending, token_id]
        # An unfinished character can only be at the end of a run of byte pieces; any other piece
        # ends the run, and SentencePiece turns what is unfinished into U+FFFD right there.
        tail = _incomplete_utf8_tail(bytes(tok.byte_value[i] for i in ids)) if tok.is_byte(token_id) else 0
        ready, self._pending = ids[: len(ids) - tail], ids[len(ids) - tail :]
        text = self._decode(ready)
        return self._filter_stops(text, final=False)

    def finish(self) -> str:
        """The text still held back at the end of generation (an unfinished character decodes to U+FFFD)."""
        if self.stopped:
            return ""
        text, self._pending = self._decode(self._pending), []
        return self._filter_stops(text, final=True)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        sp = self.tokenizer._sp  # the ids were checked in push()
        if self._at_start:
            self._at_start = all(self.tokenizer.is_control(i) for i in ids)
            return sp.decode(ids)
        return sp.decode([self._anchor_id, *ids])[len(self._anchor_text) :]

    def _filter_stops(self, delta: str, final: bool) -> str:
        if not self.stop:
            return delta
        text = self._held + delta
        # The first stop string to be complete: the smallest end; at equal ends the longest.
        best: tuple[int, int] | None = None  # (end, -length)
        for s in self.stop:
            at = text.find(s)
            if at >= 0 and (best is None or (at + len(s), -len(s)) < best):
                best = (at + len(s), -len(s))
        if best is not None:
            self.stopped, self._held = True, ""
            return text[: best[0] + best[1]]
        if final:
            self._held = ""
            return text
        # Hold back the longest end of the text that is the beginning of some stop string.
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]


def check_stop_strings(stop: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Stop strings as a list: None is none, a string is one; each must be a non-empty string."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise RequestError(f"stop[{i}] must be a non-empty string, got {s!r}", param="stop")
    return stops

"""The v3 tokenizer and the streaming detokenizer, checked against SentencePiece / mistral-common.

The oracle for text is SentencePiece's own decode of the whole sequence (through mistral-common);
the streaming detokenizer decodes piece by piece and must agree with it exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral.errors import RequestError, TokenizerError
from mistral.tokenizer import StreamingDetokenizer, Tokenizer

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
V3_FILE = DATA / "mistral_instruct_tokenizer_240323.model.v3"

TOK = Tokenizer.from_path(V3_FILE)
REF = MistralTokenizer.v3().instruct_tokenizer.tokenizer  # mistral-common's SentencePieceTokenizer

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- loading ---------------------------------------------------------------------------------------


def test_control_ids_come_from_the_file():
    expected = {  # v3's control-token ids, and the names mistral-common looks up
        "bos_id": (1, "<s>"), "eos_id": (2, "</s>"), "inst_id": (3, "[INST]"), "inst_end_id": (4, "[/INST]"),
        "tool_calls_id": (5, "[TOOL_CALLS]"), "available_tools_id": (6, "[AVAILABLE_TOOLS]"),
        "available_tools_end_id": (7, "[/AVAILABLE_TOOLS]"), "tool_results_id": (8, "[TOOL_RESULTS]"),
        "tool_results_end_id": (9, "[/TOOL_RESULTS]"),
    }
    for attr, (token_id, piece) in expected.items():
        assert getattr(TOK, attr) == token_id == REF.get_special_token(piece), attr
        assert TOK.is_control(token_id)
    assert TOK.vocab_size == REF.n_words == 32768
    assert {i for i in range(TOK.vocab_size) if TOK.is_control(i)} == REF.special_ids


def test_from_weights_folder_prefers_v3_file(tmp_path):
    shutil.copyfile(V3_FILE, tmp_path / "tokenizer.model.v3")
    shutil.copyfile(DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model")  # would fail if chosen
    assert Tokenizer.from_path(tmp_path).path.name == "tokenizer.model.v3"


def test_from_weights_folder_with_plain_tokenizer_model(tmp_path):
    shutil.copyfile(V3_FILE, tmp_path / "tokenizer.model")
    assert Tokenizer.from_path(tmp_path).encode("hi") == REF.encode("hi", bos=False, eos=False)


@pytest.mark.parametrize("setup, words", [
    (lambda d: d / "missing", "no such"),
    (lambda d: d, "no tokenizer in this folder"),
    (lambda d: _copy(DATA / "tokenizer.model.v1", d / "tokenizer.model"), "no control token [INST]"),
    (lambda d: _copy(DATA / "mistral_instruct_tokenizer_241114.model.v7", d / "tokenizer.model"), "[SYSTEM_PROMPT]"),
    (lambda d: _copy(DATA / "mistral_instruct_tokenizer_240216.model.v2", d / "t.model.v2"), "a v2 tokenizer file"),
    (lambda d: _copy(DATA / "tekken_240911.json", d / "tokenizer.model"), "not a SentencePiece model"),
    (lambda d: _write(d / "tokenizer.model.v3", b"\x00garbage" * 100), "not a SentencePiece model"),
])
def test_not_a_v3_tokenizer_fails_clearly(tmp_path, setup, words):
    path = setup(tmp_path)
    with pytest.raises(TokenizerError, match=None) as e:
        Tokenizer.from_path(path)
    assert words in str(e.value) and str(path) in str(e.value)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _write(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


# --- encode / decode -------------------------------------------------------------------------------

TEXTS = ["Hello world", "", " ", "  two leading", "trailing  ", "a\n\nb", "中文 😀 🧬 e\u0301", "שלום عربي", "\t\r\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_mistral_common(text):
    ids = TOK.encode(text)
    assert ids == REF.encode(text, bos=False, eos=False)
    assert TOK.encode(text, bos=True, eos=True) == REF.encode(text, bos=True, eos=True)
    assert TOK.decode(ids) == REF.decode(ids)


def test_control_tokens_decode_to_nothing_and_never_come_from_text():
    ids = TOK.encode("[INST] hi [/INST] </s> [TOOL_CALLS]")
    assert not any(TOK.is_control(i) for i in ids)
    assert TOK.decode([TOK.bos_id, TOK.inst_id, *ids, TOK.inst_end_id, TOK.eos_id]) == TOK.decode(ids)


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([1, 32768])
    with pytest.raises(ValueError):
        StreamingDetokenizer(TOK).push(-1)


# --- streaming -------------------------------------------------------------------------------------

BYTE_IDS = sorted(TOK.byte_value)
CONTROL_IDS = [i for i in range(40) if TOK.is_control(i)]
SPACE_IDS = [TOK.piece_to_id("▁"), TOK.piece_to_id("▁▁"), TOK.piece_to_id("▁▁▁▁")]
byte_of = {v: k for k, v in TOK.byte_value.items()}


def stream(ids, stop=()):
    d = StreamingDetokenizer(TOK, stop)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.finish())
    return deltas, d


def utf8_byte_ids(text: str) -> list[int]:
    """`text` as byte-fallback pieces only, as the model may generate any character."""
    return [byte_of[b] for b in text.encode("utf-8")]


# Any id, biased towards what makes decoding hard: byte pieces (valid or not), controls,
# bare `▁` pieces, <unk>, and whole characters spelled in bytes.
token_ids = st.lists(
    st.one_of(
        st.integers(0, TOK.vocab_size - 1).map(lambda i: [i]),
        st.sampled_from(BYTE_IDS).map(lambda i: [i]),
        st.sampled_from(CONTROL_IDS + SPACE_IDS + [0]).map(lambda i: [i]),
        st.characters(codec="utf-8").map(utf8_byte_ids),
    ),
    max_size=40,
).map(lambda chunks: [i for c in chunks for i in c])


@SETTINGS
@given(token_ids)
def test_streamed_deltas_concatenate_to_the_full_decode(ids):
    deltas, _ = stream(ids)
    assert "".join(deltas) == REF.decode(ids)


@SETTINGS
@given(st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=60), st.booleans())
def test_encoded_text_streams_back_without_replacement_characters(text, bos):
    ids = TOK.encode(text, bos=bos)
    deltas, _ = stream(ids)
    assert "".join(deltas) == REF.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


@SETTINGS
@given(st.lists(st.one_of(st.characters(codec="utf-8", exclude_characters="\ufffd"), st.sampled_from([" x", "▁"])),
                max_size=30))
def test_characters_split_over_byte_pieces_come_out_whole_and_on_time(chars):
    # Every character spelled in byte pieces; after its last byte, all text so far is out.
    d = StreamingDetokenizer(TOK)
    ids, out = [], ""
    for c in chars:
        piece = [TOK.piece_to_id("▁x")] if c == " x" else [TOK.piece_to_id("▁")] if c == "▁" else utf8_byte_ids(c)
        for i in piece:
            ids.append(i)
            delta = d.push(i)
            assert "\ufffd" not in delta
            out += delta
        assert out == REF.decode(ids)
    assert d.finish() == ""


def test_leading_space_is_dropped_once_like_the_reference():
    hello = TOK.encode("Hello")  # ▁Hello
    for ids in ([*hello, *hello], [1, *hello], [1, 3, SPACE_IDS[0], *hello], [SPACE_IDS[1], *hello]):
        deltas, _ = stream(ids)
        assert "".join(deltas) == REF.decode(ids)
    assert stream([1, *hello])[0][:2] == ["", "Hello"]


def test_unfinished_character_waits_then_flushes_as_the_reference_does():
    dna = utf8_byte_ids("🧬")
    deltas, _ = stream([*TOK.encode("x"), *dna])
    assert deltas == ["x", "", "", "", "🧬", ""]
    deltas, _ = stream([*TOK.encode("x"), *dna[:2]])  # generation ends mid-character
    assert deltas == ["x", "", "", REF.decode(dna[:2])] and deltas[-1] == "\ufffd\ufffd"


def cut_at_first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Oracle: the first place the text contains a stop string; cut at the longest one ending there."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def test_stop_string_spanning_several_tokens_is_cut():
    ids = TOK.encode("The answer is 42.\nUser: and then")
    deltas, d = stream(ids, stop=["\nUser:"])
    assert "".join(deltas) == "The answer is 42." and d.stopped
    assert d.push(TOK.encode("more")[0]) == ""  # nothing after a stop


def test_partial_stop_is_held_then_released():
    ids = TOK.encode("Use the force")
    deltas, d = stream(ids, stop=["User:"])
    assert "".join(deltas) == "Use the force" and not d.stopped
    assert deltas[0] == ""  # "Use" could have been the start of "User:"


def test_empty_stop_string_is_a_request_error():
    with pytest.raises(RequestError) as e:
        StreamingDetokenizer(TOK, stop=["ok", ""])
    assert e.value.param == "stop"


words = st.sampled_from(["a", "b", "ab", " ", "\n", "é", "中", "🧬", "ba", "User", ":"])


@SETTINGS
@given(st.lists(words, min_size=1, max_size=25), st.data())
def test_stop_strings_are_cut_exactly(pieces, data):
    text = "".join(pieces)
    ids = TOK.encode(text)
    full = REF.decode(ids)
    # One stop taken from the text itself (so it usually spans tokens), plus random ones.
    i = data.draw(st.integers(0, len(full) - 1))
    j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
    stops = [full[i:j], *data.draw(st.lists(st.text("ab :\n中", min_size=1, max_size=4), max_size=2))]
    deltas, d = stream(ids, stop=stops)
    expected, stopped = cut_at_first_stop(full, stops)
    assert "".join(deltas) == expected
    assert d.stopped == stopped


@SETTINGS
@given(token_ids, st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_strings_on_random_tokens(ids, stops):
    deltas, d = stream(ids, stop=stops)
    expected, stopped = cut_at_first_stop(REF.decode(ids), stops)
    assert "".join(deltas) == expected and d.stopped == stopped


def test_integer_types_from_torch_are_accepted():
    torch = pytest.importorskip("torch")
    ids = TOK.encode("tensor ids 🧬")
    assert TOK.decode(torch.tensor(ids)) == REF.decode(ids)
    d = StreamingDetokenizer(TOK, stop=None)
    assert "".join(d.push(i) for i in torch.tensor(ids)) + d.finish() == REF.decode(ids)
    with pytest.raises(ValueError, match="integers"):
        TOK.decode([1.5])

"""Byte-level BPE tokenizer (latkv.llm.tokenizer): exact round trip, merge order, pre-tokenizers,
special tokens, BOS, errors, GGUF metadata; and SmolLM2's real vocabulary where it is cached.

The tiny vocabulary below is the 256 byte tokens (id = byte value) and a few merges, so every
expected id list can be worked out by hand from the merge ranks.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from latkv.llm.tokenizer import Tokenizer


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode, written out here (not taken from the module under test)."""
    byte_values = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                   + list(range(ord("®"), ord("ÿ") + 1)))
    code_points = byte_values[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    by_byte = dict(zip(byte_values, code_points))
    return [chr(by_byte[byte]) for byte in range(256)]


BYTE_SYMBOLS = gpt2_byte_symbols()
AB, BC, ABC, D12, D123, SPACE_A, D34, IM_START, IM_END, TOOL = range(256, 266)
SPACE = 0x20  # the token "Ġ"
TINY_TOKENS = BYTE_SYMBOLS + ["ab", "bc", "abc", "12", "123", "Ġa", "34",
                             "<|im_start|>", "<|im_end|>", "<tool>"]
TINY_TYPES = [1] * 263 + [3, 3, 4]  # two control tokens, one user-defined
TINY_MERGES = ["b c", "a b", "a bc", "1 2", "12 3", "Ġ a", "3 4"]  # rank = position


def tiny(pre: str = "smollm", merges: list[str] = TINY_MERGES, **options) -> Tokenizer:
    return Tokenizer(TINY_TOKENS, merges, TINY_TYPES, pre=pre, **options)


def ids(tokenizer: Tokenizer, text: str, **options) -> list[int]:
    encoded = tokenizer.encode(text, **options)
    assert encoded.dtype == np.int32 and encoded.ndim == 1
    return encoded.tolist()


# ---------------------------------------------------------------------------- round trip

SPECIAL_HEAVY_TEXT = st.lists(
    st.one_of(st.text(), st.sampled_from(["<|im_start|>", "<|im_end|>", "<tool>", "<|im_",
                                          "abc", " 123", "3434", "  \n", "'s"]))
).map("".join)


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "default", "qwen2", "llama-bpe"])
@given(text=st.text())
def test_decode_of_encode_is_the_text_exactly(pre, text):
    tokenizer = tiny(pre)
    for special in (False, True):
        encoded = tokenizer.encode(text, special=special)
        assert tokenizer.decode_bytes(encoded) == text.encode("utf-8")
        assert tokenizer.decode(encoded) == text


@given(text=SPECIAL_HEAVY_TEXT)
def test_round_trip_with_special_token_texts_in_the_text(text):
    tokenizer = tiny()
    for special in (False, True):
        assert tokenizer.decode_bytes(tokenizer.encode(text, special=special)) == text.encode()


def test_decode_bytes_is_exact_for_partial_characters():
    tokenizer = tiny()
    assert tokenizer.decode_bytes([0xE2, 0x98]) == b"\xe2\x98"  # two of the three bytes of ☕
    assert tokenizer.decode([0xE2, 0x98]) == "\ufffd"  # errors="replace"
    assert tokenizer.decode_bytes([]) == b""
    assert tokenizer.decode(np.array([IM_START, ABC], dtype=np.int64)) == "<|im_start|>abc"


# ---------------------------------------------------------------------------- BPE and splits

def test_merges_apply_in_rank_order():
    # "abc": pairs (a,b) rank 1 and (b,c) rank 0 -> "bc" first, then "a bc" (rank 2) -> "abc"
    assert ids(tiny(), "abc") == [ABC]
    # with "a b" ranked first: "ab" + "c", and no merge "ab c" exists
    assert ids(tiny(merges=["a b", "b c", "a bc"]), "abc") == [AB, ord("c")]
    # " abc": bc (0), then a+bc (2) beats Ġ+a (5) -> "Ġ", "abc"
    assert ids(tiny("gpt2"), " abc") == [SPACE, ABC]
    assert ids(tiny("gpt2"), " ab") == [SPACE, AB]  # a+b (1) before Ġ+a (5)
    assert ids(tiny("gpt2"), " a") == [SPACE_A]
    assert ids(tiny(), "abab") == [AB, AB]


def test_digits_are_single_pieces_under_smollm_and_grouped_under_gpt2():
    assert ids(tiny("smollm"), " 123") == [SPACE, ord("1"), ord("2"), ord("3")]
    assert ids(tiny("gpt2"), " 123") == [SPACE, D123]  # one piece: 1+2, then 12+3
    assert ids(tiny("smollm"), "x12") == [ord("x"), ord("1"), ord("2")]
    assert ids(tiny("gpt2"), "x12") == [ord("x"), D12]
    assert ids(tiny("gpt2"), "1234") == [D123, ord("4")]
    assert ids(tiny("smollm"), "3434") == [ord("3"), ord("4"), ord("3"), ord("4")]
    assert ids(tiny("gpt2"), "3434") == [D34, D34]


def test_default_qwen2_and_llama_bpe_number_splits():
    # llama.cpp's "default": digit runs cut into threes from the left: "343" + "4"
    assert ids(tiny("default"), "3434") == [D34, ord("3"), ord("4")]
    # qwen2: every digit alone; llama-bpe: runs of up to three digits
    assert ids(tiny("qwen2"), "x1234") == [ord("x"), ord("1"), ord("2"), ord("3"), ord("4")]
    assert ids(tiny("llama-bpe"), "x1234") == [ord("x"), D123, ord("4")]


def test_whitespace_runs_keep_one_space_for_the_next_word():
    # GPT-2 split of "a   a": "a", "  ", " a"
    assert ids(tiny("gpt2"), "a   a") == [ord("a"), SPACE, SPACE, SPACE_A]
    assert ids(tiny("gpt2"), "a\n") == [ord("a"), 0x0A]


def test_llama_bpe_takes_a_piece_that_is_a_token_whole():
    tokenizer_tokens = BYTE_SYMBOLS + ["xyz"]  # no merges lead to "xyz"
    assert ids(Tokenizer(tokenizer_tokens, [], pre="llama-bpe"), "xyz") == [256]
    assert ids(Tokenizer(tokenizer_tokens, [], pre="qwen2"), "xyz") == [ord("x"), ord("y"),
                                                                        ord("z")]


# ---------------------------------------------------------------------------- special tokens

def test_control_tokens_only_with_special_true():
    tokenizer = tiny()
    assert ids(tokenizer, "<|im_start|>abc<|im_end|>", special=True) == [IM_START, ABC, IM_END]
    # special=False: the text of the token goes through the pre-tokenizer and BPE like any text
    plain = list(b"<|im_start|>")
    assert ids(tokenizer, "<|im_start|>abc") == plain + [ABC]
    assert tokenizer.decode([IM_START, IM_END]) == "<|im_start|><|im_end|>"


def test_user_defined_tokens_are_matched_either_way():
    tokenizer = tiny()
    for special in (False, True):
        assert ids(tokenizer, "x<tool>y", special=special) == [ord("x"), TOOL, ord("y")]


# ---------------------------------------------------------------------------- BOS

def test_add_bos_default_and_override():
    with_bos = tiny(bos_id=IM_START, eos_id=IM_END, add_bos=True)
    assert ids(with_bos, "a") == [IM_START, ord("a")]
    assert ids(with_bos, "a", add_bos=False) == [ord("a")]
    assert ids(with_bos, "") == [IM_START]
    without = tiny(bos_id=IM_START)
    assert ids(without, "a") == [ord("a")]
    assert ids(without, "a", add_bos=True) == [IM_START, ord("a")]
    with pytest.raises(ValueError, match="bos_id"):
        tiny().encode("a", add_bos=True)
    with pytest.raises(ValueError, match="bos_id"):
        tiny(add_bos=True)


# ---------------------------------------------------------------------------- vocabulary

def test_vocabulary_lookups():
    tokenizer = tiny()
    assert tokenizer.vocab_size == len(TINY_TOKENS)
    assert tokenizer.token_to_id("<|im_end|>") == IM_END
    assert tokenizer.token_to_id("Ġa") == SPACE_A
    assert tokenizer.id_to_token(SPACE) == "Ġ"
    assert tokenizer.id_to_token(np.int64(ABC)) == "abc"


# ---------------------------------------------------------------------------- errors

def test_errors_name_the_argument():
    tokenizer = tiny()
    with pytest.raises(ValueError, match=r"pre='tekken'.*smollm"):
        tiny("tekken")
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"abc")
    with pytest.raises(ValueError, match=r"ids\[1\] = 266 is out of range"):
        tokenizer.decode([0, 266])
    with pytest.raises(ValueError, match=r"ids\[0\] = -1 is out of range"):
        tokenizer.decode_bytes(np.array([-1, 3]))
    with pytest.raises(TypeError, match=r"ids\[0\] must be an integer"):
        tokenizer.decode([1.0])
    with pytest.raises(TypeError, match="ids must be integers"):
        tokenizer.decode(np.array([1.0]))
    with pytest.raises(ValueError, match="i must be in"):
        tokenizer.id_to_token(266)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.token_to_id("zz")
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer.encode("a\ud800")
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        Tokenizer(TINY_TOKENS, ["ab"])
    with pytest.raises(ValueError, match="token_types has 2 entries"):
        Tokenizer(TINY_TOKENS, [], [1, 1])


def test_a_byte_without_a_token_is_refused_not_dropped():
    tokens = [symbol for byte, symbol in enumerate(BYTE_SYMBOLS) if byte != 0x04]
    tokenizer = Tokenizer(tokens, [])
    assert ids(tokenizer, "ab") == [ord("a") - 1, ord("b") - 1]  # ids above 4 shift down by one
    with pytest.raises(ValueError, match="byte 0x04 has no token"):
        tokenizer.encode("a\x04b")


# ---------------------------------------------------------------------------- GGUF metadata

def write_tokenizer_gguf(path: Path, *, model: str = "gpt2", pre: str | None = "smollm",
                         omit: tuple[str, ...] = ()) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if "tokens" not in omit:
        writer.add_token_list(TINY_TOKENS)
    if "merges" not in omit:
        writer.add_token_merges(TINY_MERGES)
    writer.add_token_types(TINY_TYPES)
    writer.add_bos_token_id(IM_START)
    writer.add_eos_token_id(IM_END)
    writer.add_add_bos_token(True)
    writer.add_tensor("placeholder", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def test_from_gguf_reads_the_tokenizer_fields(tmp_path):
    tokenizer = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tiny.gguf"))
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (266, IM_START, IM_END)
    assert tokenizer.add_bos and tokenizer.pre == "smollm"
    assert ids(tokenizer, " 123") == [IM_START, SPACE, ord("1"), ord("2"), ord("3")]
    assert ids(tokenizer, "abc<|im_end|>", special=True, add_bos=False) == [ABC, IM_END]
    assert ids(tokenizer, "x<tool>", add_bos=False) == [ord("x"), TOOL]


def test_from_gguf_without_a_pre_tokenizer_uses_llama_cpp_default(tmp_path):
    tokenizer = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "nopre.gguf", pre=None))
    assert tokenizer.pre == "default"
    assert ids(tokenizer, "3434", add_bos=False) == [D34, ord("3"), ord("4")]


def test_from_gguf_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'tekken'.*supported: smollm"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "pre.gguf", pre="tekken"))
    with pytest.raises(ValueError, match="no tokenizer.ggml.merges field"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "m.gguf", omit=("merges",)))
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens field"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", omit=("tokens",)))


# ---------------------------------------------------------------------------- SmolLM2

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Verified one-off against HuggingFace `tokenizers` (BPE from the same GGUF vocabulary and
# merges, pre-tokenizer Digits(individual_digits=True) + ByteLevel(add_prefix_space=False)).
SMOLLM2_IDS = [
    ("Hello world", False, [19556, 905]),
    (" 12345", False, [216, 33, 34, 35, 36, 37]),
    ("The capital of France is", False, [504, 3575, 282, 4649, 314]),
    ("  multiple   spaces", False, [216, 2701, 256, 5600]),
    ("Café déjà vu.", False, [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>", True,
     [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2]),
    ("<|im_start|>", False, [44, 108, 306, 79, 3738, 108, 46]),
]


def smollm2_path() -> Path:
    named = os.environ.get("LATKV_SMOLLM2_GGUF")
    path = Path(named) if named else Path.home() / ".cache" / "latkv" / "models" / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip("SmolLM2 GGUF not cached: run `latkv model fetch smollm2`")
    return path


def test_smollm2_known_ids_and_exact_round_trip():
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(str(smollm2_path())))
    assert (tokenizer.vocab_size, tokenizer.pre, tokenizer.add_bos) == (49152, "smollm", False)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    for text, special, expected in SMOLLM2_IDS:
        assert ids(tokenizer, text, special=special) == expected, text
    import collections
    import json
    import textwrap
    text = "\n\n".join(inspect.getdoc(module) for module in (os, json, collections, textwrap))
    text += "\nnaïve café — Ελληνικά, 中文, 😀👍🏽 ½ ²\t\t x  \r\n"
    assert len(text) > 4000
    encoded = tokenizer.encode(text)
    assert len(encoded) < len(text) / 2.5  # real merges, not bytes
    assert tokenizer.decode(encoded) == text

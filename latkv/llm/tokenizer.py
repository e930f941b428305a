"""Byte-level BPE tokenizer of a GGUF model (GPT-2 style; llama.cpp's ``"gpt2"`` tokenizer model).

Text becomes token ids in four steps, the ones llama.cpp takes (``src/llama-vocab.cpp``,
``llm_tokenizer_bpe``) and HuggingFace ``tokenizers`` takes for the same ``tokenizer.json``:

1. **Special tokens.** Exact occurrences of the text of added tokens are cut out first and
   become their single ids: user-defined tokens always, control (and unknown) tokens only
   with ``encode(..., special=True)``. Tokens are tried longest text first, each over the
   text left between earlier matches.
2. **Pre-tokenization.** Each remaining stretch of text is split by the regular expressions
   of the model's pre-tokenizer, applied one after the other: every match and every stretch
   between matches is a piece, and the next expression splits each piece again.
3. **Byte-level alphabet.** Each piece's UTF-8 bytes are written with GPT-2's
   ``bytes_to_unicode`` table (`BYTE_TO_UNICODE`): one printable character per byte, e.g.
   the space ``0x20`` is ``"Ġ"`` and the newline ``0x0A`` is ``"Ċ"``.
4. **BPE.** Starting from single characters, the adjacent pair with the lowest merge rank
   (its position in ``tokenizer.ggml.merges``; the leftmost pair on ties) is merged until no
   pair has a rank. Each final symbol is a token; one missing from the vocabulary falls back
   to its characters. Results are cached per piece.

``decode_bytes`` maps ids back: normal tokens through the inverse byte table, control,
unknown and user-defined tokens as the UTF-8 of their text. Byte-level BPE is lossless:
``decode(encode(text)) == text`` for every ``str`` (with ``special`` False or True), provided
each byte of its UTF-8 has a token in the vocabulary. ``encode`` raises ``ValueError``
otherwise, rather than dropping the character as llama.cpp does: GPT-2's vocabulary has all
256 byte tokens; SmolLM2's lacks 21, of which 8 occur in UTF-8 text (the control characters
U+0004, U+0006, U+0013, U+0014, U+0016, U+001D, and the lead bytes of U+40000..U+BFFFF,
code points that Unicode leaves unassigned). A ``str`` with a lone surrogate has no UTF-8 and
is refused too.

GGUF fields read by `Tokenizer.from_gguf`
-----------------------------------------
``tokenizer.ggml.model`` (must be ``"gpt2"``), ``tokenizer.ggml.tokens`` and
``tokenizer.ggml.merges`` (required); ``tokenizer.ggml.pre`` (``"default"`` when absent, as
in llama.cpp), ``tokenizer.ggml.token_type`` (all normal when absent),
``tokenizer.ggml.bos_token_id``, ``tokenizer.ggml.eos_token_id`` and
``tokenizer.ggml.add_bos_token`` (the pre-tokenizer's default when absent: True for
``llama-bpe``, else False).

Pre-tokenizers (`PRE_TOKENIZERS`, by their ``tokenizer.ggml.pre`` names)
------------------------------------------------------------------------
``"smollm"``
    Each ``\\p{N}`` character alone, then the GPT-2 expression (HuggingFace: ``Digits
    (individual_digits=True)`` then ``ByteLevel(add_prefix_space=False)``). SmolLM2 uses it.
``"gpt2"``, ``"gpt-2"``
    The GPT-2 expression ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
    \\s+(?!\\S)|\\s+`` (llama.cpp spells the name ``"gpt-2"``).
``"default"``
    llama.cpp's fallback for a GGUF without a pre-tokenizer name: runs of punctuation and
    ``$+<=>^~|`` first, then the GPT-2 expression, then ``\\p{N}+``, then ``[0-9]{3}``
    (digit runs split into threes from the left). It is *not* the plain GPT-2 split.
``"qwen2"``
    Qwen2's expression: contractions of any case, an optional non-letter before a letter
    run, each ``\\p{N}`` alone, newlines kept with the punctuation before them.
``"llama-bpe"`` (also ``"llama3"``, ``"llama-v3"``)
    Llama 3's expression (as ``"qwen2"`` but numbers in runs of up to three digits). As in
    llama.cpp, a piece that is itself a vocabulary token is not merged further
    (``ignore_merges``).

Examples
--------
A vocabulary of the 256 byte tokens (ids 0..255 by byte value), four merges and a control
token:

>>> from latkv.llm.tokenizer import BYTE_TO_UNICODE, Tokenizer
>>> tokens = list(BYTE_TO_UNICODE) + ["he", "ll", "hell", "hello", "<|im_start|>"]
>>> merges = ["h e", "l l", "he ll", "hell o"]
>>> tokenizer = Tokenizer(tokens, merges, [1] * 260 + [3], pre="smollm")
>>> tokenizer.encode("hello 42").tolist()  # "hello", " ", "4", "2"
[259, 32, 52, 50]
>>> ids = tokenizer.encode("<|im_start|>hello", special=True)
>>> ids.tolist(), ids.dtype
([260, 259], dtype('int32'))
>>> tokenizer.decode(ids)
'<|im_start|>hello'
>>> tokenizer.decode(tokenizer.encode("naïve café ☕ 12\\n")) == "naïve café ☕ 12\\n"
True
"""

from __future__ import annotations

import heapq
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import regex

from latkv.checks import check_int

__all__ = [
    "BYTE_TO_UNICODE",
    "PRE_TOKENIZERS",
    "PreTokenizer",
    "Tokenizer",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_UNKNOWN",
    "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_USER_DEFINED",
    "TOKEN_TYPE_UNUSED",
    "TOKEN_TYPE_BYTE",
]

# ``tokenizer.ggml.token_type`` values (gguf.TokenType, llama.cpp's llama_token_type)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6


def _gpt2_bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's ``bytes_to_unicode``: byte ``b`` -> one printable character, as a tuple by ``b``.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves;
    the other 68 bytes, in increasing order, take the characters U+0100, U+0101, ...
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    characters = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + shifted)
            shifted += 1
    return tuple(characters[byte] for byte in range(256))


BYTE_TO_UNICODE: tuple[str, ...] = _gpt2_bytes_to_unicode()
"""The character that stands for byte ``b`` in byte-level BPE tokens, at index ``b``."""

_UNICODE_TO_BYTE = {character: byte for byte, character in enumerate(BYTE_TO_UNICODE)}
# str.translate tables: Latin-1 character chr(b) <-> the byte-level character of b
_LATIN1_TO_BYTE_LEVEL = {byte: character for byte, character in enumerate(BYTE_TO_UNICODE)}
_BYTE_LEVEL_TO_LATIN1 = {code: "\uffff" for code in range(256)}  # not byte-level: no Latin-1
_BYTE_LEVEL_TO_LATIN1.update(
    {ord(character): byte for byte, character in enumerate(BYTE_TO_UNICODE)})
_BYTE_TOKEN_TEXT = regex.compile(r"<0x([0-9A-Fa-f]{2})>")

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's forms of the Qwen2 / Llama 3 expressions: "(?i:'s|...)" written out per letter
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                 r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How one ``tokenizer.ggml.pre`` value splits text before BPE.

    Attributes
    ----------
    patterns : tuple of str
        Regular expressions (``regex`` module syntax) applied one after the other; each
        splits every piece of the previous one into its matches and the stretches between.
    ignore_merges : bool
        A piece that is itself a vocabulary token is emitted whole, without BPE.
    add_bos : bool
        Whether a BOS token is prepended when the GGUF has no ``tokenizer.ggml.add_bos_token``.
    """

    patterns: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2 = PreTokenizer((_GPT2_SPLIT,))
_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "smollm": PreTokenizer((r"\p{N}", _GPT2_SPLIT)),
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "default": PreTokenizer((
        r"[\p{P}\$\+<=>\^~\|]+",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    )),
    "qwen2": PreTokenizer((_QWEN2_SPLIT,)),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}
"""Supported ``tokenizer.ggml.pre`` values and their splits (llama.cpp ``llm_tokenizer_bpe``)."""

_COMPILED_PATTERNS = {
    name: tuple(regex.compile(pattern) for pattern in pre.patterns)
    for name, pre in PRE_TOKENIZERS.items()
}
_PIECE_CACHE_LIMIT = 1 << 17  # cached pieces per tokenizer before the cache is emptied


def _split_by_patterns(text: str, patterns: Sequence[Any]) -> list[str]:
    """Split ``text`` by each compiled pattern in turn, keeping the text between matches."""
    pieces = [text]
    for pattern in patterns:
        refined: list[str] = []
        for piece in pieces:
            position = 0
            for match in pattern.finditer(piece):
                start, end = match.span()
                if start == end:
                    continue
                if start > position:
                    refined.append(piece[position:start])
                refined.append(piece[start:end])
                position = end
            if position < len(piece):
                refined.append(piece[position:])
        pieces = refined
    return pieces


def _token_bytes(text: str, token_type: int) -> bytes:
    """The bytes that token text ``text`` of type ``token_type`` stands for when decoded."""
    if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED,
                      TOKEN_TYPE_UNUSED):
        return text.encode("utf-8")
    if token_type == TOKEN_TYPE_BYTE:
        byte_match = _BYTE_TOKEN_TEXT.fullmatch(text)
        if byte_match is not None:
            return bytes([int(byte_match.group(1), 16)])
    try:
        return text.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte-level alphabet: keep its UTF-8
        return b"".join(
            bytes([_UNICODE_TO_BYTE[character]]) if character in _UNICODE_TO_BYTE
            else character.encode("utf-8", errors="surrogatepass")
            for character in text
        )


class Tokenizer:
    """Byte-level BPE tokenizer: text <-> int32 token ids (see the module docstring).

    Parameters
    ----------
    tokens : list of str
        The vocabulary, ``tokens[i]`` the text of token id ``i``; normal tokens are written in
        the byte-level alphabet (`BYTE_TO_UNICODE`), control and user-defined ones as text.
    merges : list of str
        BPE merges ``"left right"`` (one space between), lowest rank first.
    token_types : list of int, optional
        ``tokenizer.ggml.token_type`` per token: 1 normal, 2 unknown, 3 control,
        4 user-defined, 5 unused, 6 byte. Default: every token normal (no special tokens).
    pre : str
        Pre-tokenizer name, a key of `PRE_TOKENIZERS`.
    bos_id, eos_id : int, optional
        Beginning- and end-of-sequence token ids.
    add_bos : bool
        Whether ``encode`` prepends ``bos_id`` by default.

    Raises
    ------
    TypeError
        An argument of the wrong type.
    ValueError
        An empty vocabulary, a merge without a space, ``token_types`` of another length,
        an unsupported ``pre``, ids out of range, or ``add_bos`` without ``bos_id``.

    Examples
    --------
    >>> from latkv.llm.tokenizer import BYTE_TO_UNICODE, Tokenizer
    >>> tokenizer = Tokenizer(list(BYTE_TO_UNICODE) + ["ab"], ["a b"], pre="gpt2")
    >>> tokenizer.encode("abc").tolist(), tokenizer.vocab_size
    ([256, 99], 257)
    """

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None = None,
        *,
        pre: str = "gpt2",
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
    ) -> None:
        if isinstance(tokens, str) or not isinstance(tokens, Sequence):
            raise TypeError(f"tokens must be a list of str, got {type(tokens).__name__}")
        if len(tokens) == 0:
            raise ValueError("tokens is empty: a tokenizer needs a vocabulary")
        for index, token in enumerate(tokens):
            if not isinstance(token, str):
                raise TypeError(f"tokens[{index}] must be a str, got {type(token).__name__}")
        if isinstance(merges, str) or not isinstance(merges, Sequence):
            raise TypeError(f"merges must be a list of str, got {type(merges).__name__}")
        if not isinstance(pre, str):
            raise TypeError(f"pre must be a str, got {type(pre).__name__}")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported pre-tokenizer pre={pre!r}; supported: {', '.join(PRE_TOKENIZERS)}"
            )
        vocab_size = len(tokens)
        if token_types is None:
            token_types = [TOKEN_TYPE_NORMAL] * vocab_size
        elif len(token_types) != vocab_size:
            raise ValueError(
                f"token_types has {len(token_types)} entries but tokens has {vocab_size}"
            )
        token_types = [check_int(value, f"token_types[{index}]")
                       for index, value in enumerate(token_types)]
        self.bos_id = None if bos_id is None else check_int(bos_id, "bos_id", 0, vocab_size - 1)
        self.eos_id = None if eos_id is None else check_int(eos_id, "eos_id", 0, vocab_size - 1)
        if not isinstance(add_bos, (bool, np.bool_)):
            raise TypeError(f"add_bos must be a bool, got {type(add_bos).__name__}")
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True needs a bos_id, got bos_id=None")
        self.add_bos = bool(add_bos)
        self.pre = pre

        self._tokens = list(tokens)
        self._token_types = token_types
        self._token_to_id: dict[str, int] = {}
        for index, token in enumerate(self._tokens):
            self._token_to_id[token] = index  # a repeated text maps to its last id (llama.cpp)
        self._merge_ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            if not isinstance(merge, str):
                raise TypeError(f"merges[{rank}] must be a str, got {type(merge).__name__}")
            space = merge.find(" ", 1)  # as llama.cpp: the first space after the first char
            if space < 0:
                raise ValueError(
                    f"merges[{rank}] = {merge!r} is not two symbols joined by a space")
            self._merge_ranks.setdefault((merge[:space], merge[space + 1:]), rank)
        self._decoded = [_token_bytes(text, kind) for text, kind in zip(self._tokens, token_types)]

        special = [(text, index) for index, (text, kind) in enumerate(zip(tokens, token_types))
                   if text and kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN,
                                        TOKEN_TYPE_USER_DEFINED)]
        special.sort(key=lambda entry: -len(entry[0].encode("utf-8")))  # longest first (stable)
        self._special_all = special
        self._special_user_defined = [(text, index) for text, index in special
                                      if token_types[index] == TOKEN_TYPE_USER_DEFINED]
        self._patterns = _COMPILED_PATTERNS[pre]
        self._ignore_merges = PRE_TOKENIZERS[pre].ignore_merges
        self._piece_cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """Build the tokenizer from a GGUF file's metadata (fields: see the module docstring).

        Parameters
        ----------
        reader : gguf.GGUFReader
            The opened model file.

        Returns
        -------
        Tokenizer

        Raises
        ------
        ValueError
            ``tokenizer.ggml.model`` is not ``"gpt2"``, ``tokenizer.ggml.pre`` names an
            unsupported pre-tokenizer, or a required field is missing (the message names it).

        Examples
        --------
        With SmolLM2-135M-Instruct (``latkv model fetch smollm2``; not run here, it needs the
        file)::

            import gguf
            reader = gguf.GGUFReader("SmolLM2-135M-Instruct.Q4_1.gguf")
            Tokenizer.from_gguf(reader).encode("Hello world")  # array([19556, 905], dtype=int32)
        """
        fields = getattr(reader, "fields", None)
        if fields is None:
            raise TypeError(f"reader must be a gguf.GGUFReader, got {type(reader).__name__}")

        def field_value(name: str, required: bool, default: Any = None) -> Any:
            if name not in fields:
                if required:
                    raise ValueError(f"the GGUF has no {name} field; the tokenizer needs it")
                return default
            return fields[name].contents()

        model = field_value("tokenizer.ggml.model", required=True)
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        pre = field_value("tokenizer.ggml.pre", required=False, default="default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"tokenizer.ggml.pre is {pre!r}, an unsupported pre-tokenizer; supported: "
                f"{', '.join(PRE_TOKENIZERS)}"
            )
        tokens = field_value("tokenizer.ggml.tokens", required=True)
        merges = field_value("tokenizer.ggml.merges", required=True)
        token_types = field_value("tokenizer.ggml.token_type", required=False)
        bos_id = field_value("tokenizer.ggml.bos_token_id", required=False)
        eos_id = field_value("tokenizer.ggml.eos_token_id", required=False)
        add_bos = field_value("tokenizer.ggml.add_bos_token", required=False)
        if add_bos is None:  # the pre-tokenizer's default, where there is a BOS token to add
            add_bos = PRE_TOKENIZERS[pre].add_bos and bos_id is not None
        elif add_bos and bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is True but the GGUF has no "
                             "tokenizer.ggml.bos_token_id field")
        return cls(tokens, merges, token_types, pre=pre, bos_id=bos_id, eos_id=eos_id,
                   add_bos=bool(add_bos))

    @property
    def vocab_size(self) -> int:
        """Number of tokens; ids are in ``[0, vocab_size)``."""
        return len(self._tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merge_ranks)}, "
                f"pre={self.pre!r}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"add_bos={self.add_bos})")

    # ------------------------------------------------------------------ encoding

    def encode(
        self, text: str, *, special: bool = False, add_bos: bool | None = None
    ) -> np.ndarray:
        """Token ids of ``text``.

        Parameters
        ----------
        text : str
            Any text whose UTF-8 bytes all have byte tokens (see the module docstring).
        special : bool
            True: exact occurrences of control token texts (``"<|im_start|>"``) become their
            ids. False: they are encoded as plain text. User-defined tokens are matched
            either way (llama.cpp and HuggingFace do the same).
        add_bos : bool, optional
            Prepend ``bos_id``; None takes the tokenizer's ``add_bos``.

        Returns
        -------
        numpy.ndarray
            Shape ``(n_tokens,)``, int32.

        Raises
        ------
        TypeError
            ``text`` is not a str.
        ValueError
            ``text`` has a lone surrogate or a character with an untokenizable byte, or
            ``add_bos`` is True without a ``bos_id``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if add_bos is None:
            add_bos = self.add_bos
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_id")
            ids.append(self.bos_id)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"text has a lone surrogate {text[error.start]!r} at index {error.start}: it "
                "has no UTF-8 encoding, so byte-level BPE cannot encode it"
            ) from None
        encode_piece = self._encode_piece
        for fragment in self._split_special(text, special):
            if isinstance(fragment, int):
                ids.append(fragment)
                continue
            for piece in _split_by_patterns(fragment, self._patterns):
                ids.extend(encode_piece(piece))
        return np.asarray(ids, dtype=np.int32)

    def _split_special(self, text: str, special: bool) -> list[str | int]:
        """``text`` as raw-text fragments (str) and special token ids (int), llama.cpp's order."""
        fragments: list[str | int] = [text]
        for token_text, token_id in (self._special_all if special
                                     else self._special_user_defined):
            if token_text not in text:
                continue
            refined: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token_text not in fragment:
                    refined.append(fragment)
                    continue
                for position, part in enumerate(fragment.split(token_text)):
                    if position:
                        refined.append(token_id)
                    if part:
                        refined.append(part)
            fragments = refined
        return fragments

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenized piece (cached)."""
        cached = self._piece_cache.get(piece)
        if cached is not None:
            return cached
        word = piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)
        token_to_id = self._token_to_id
        ids: list[int] = []
        for symbol in self._merge(word):
            token_id = token_to_id.get(symbol)
            if token_id is not None:
                ids.append(token_id)
                continue
            for character in symbol:  # a merge result outside the vocabulary: its characters
                token_id = token_to_id.get(character)
                if token_id is None:
                    raise ValueError(self._missing_byte_message(piece, character))
                ids.append(token_id)
        result = tuple(ids)
        if len(self._piece_cache) >= _PIECE_CACHE_LIMIT:
            self._piece_cache.clear()
        self._piece_cache[piece] = result
        return result

    @staticmethod
    def _missing_byte_message(piece: str, byte_character: str) -> str:
        byte = _UNICODE_TO_BYTE[byte_character]
        culprit = next((character for character in piece
                        if byte in character.encode("utf-8")), piece)
        return (f"text contains {culprit!r} (U+{ord(culprit[0]):04X}), whose UTF-8 byte "
                f"0x{byte:02X} has no token in this vocabulary; byte-level BPE cannot encode it")

    def _merge(self, word: str) -> list[str]:
        """BPE on one byte-level word: merge the lowest-ranked adjacent pair, leftmost first."""
        if len(word) < 2 or (self._ignore_merges and word in self._token_to_id):
            return [word]
        ranks = self._merge_ranks
        symbols: list[str | None] = list(word)
        following = list(range(1, len(word) + 1))
        following[-1] = -1
        preceding = list(range(-1, len(word) - 1))
        queue = []
        for left in range(len(word) - 1):
            rank = ranks.get((word[left], word[left + 1]))
            if rank is not None:
                queue.append((rank, left, word[left], word[left + 1]))
        heapq.heapify(queue)
        while queue:
            _, left, left_text, right_text = heapq.heappop(queue)
            right = following[left]
            if right < 0 or symbols[left] != left_text or symbols[right] != right_text:
                continue  # outdated: one side was merged since this pair was queued
            merged = left_text + right_text
            symbols[left] = merged
            symbols[right] = None
            following[left] = following[right]
            if following[right] >= 0:
                preceding[following[right]] = left
            before, after = preceding[left], following[left]
            if before >= 0:
                rank = ranks.get((symbols[before], merged))
                if rank is not None:
                    heapq.heappush(queue, (rank, before, symbols[before], merged))
            if after >= 0:
                rank = ranks.get((merged, symbols[after]))
                if rank is not None:
                    heapq.heappush(queue, (rank, left, merged, symbols[after]))
        return [symbol for symbol in symbols if symbol is not None]

    # ------------------------------------------------------------------ decoding

    def _checked_ids(self, ids: Any) -> list[int]:
        """``ids`` as a list of ints in ``[0, vocab_size)``; TypeError / ValueError otherwise."""
        vocab_size = len(self._tokens)
        if not isinstance(ids, (list, tuple)) and hasattr(ids, "__array__"):  # NumPy arrays, scalars
            array = np.asarray(ids)
            if array.ndim > 1:
                raise ValueError(f"ids must be one-dimensional, got shape {array.shape}")
            array = array.reshape(-1)
            if array.size == 0:
                return []
            if array.dtype.kind not in "iu":
                raise TypeError(f"ids must be integers, got dtype {array.dtype}")
            bad = np.flatnonzero((array < 0) | (array >= vocab_size))
            if bad.size:
                position = int(bad[0])
                raise ValueError(f"ids[{position}] = {int(array[position])} is out of range: "
                                 f"token ids are in [0, {vocab_size})")
            return array.tolist()
        if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
            ids = [ids]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"ids must be a sequence of integers, got {type(ids).__name__}")
        checked = []
        for position, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"ids[{position}] must be an integer, got "
                                f"{type(value).__name__} {value!r}")
            value = int(value)
            if not 0 <= value < vocab_size:
                raise ValueError(f"ids[{position}] = {value} is out of range: "
                                 f"token ids are in [0, {vocab_size})")
            checked.append(value)
        return checked

    def decode_bytes(self, ids: Any) -> bytes:
        """The exact bytes that ``ids`` stand for; control tokens render as their text.

        Parameters
        ----------
        ids : sequence of int or numpy.ndarray
            Token ids, shape ``(n,)``, any integer dtype, each in ``[0, vocab_size)``.

        Returns
        -------
        bytes
            Possibly not valid UTF-8 (an id sequence may cut a character).
        """
        decoded = self._decoded
        return b"".join([decoded[token_id] for token_id in self._checked_ids(ids)])

    def decode(self, ids: Any) -> str:
        """``decode_bytes(ids).decode("utf-8", errors="replace")``."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ vocabulary

    def token_to_id(self, token: str) -> int:
        """Id of the token whose text (as in ``tokenizer.ggml.tokens``) is ``token``."""
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        token_id = self._token_to_id.get(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    def id_to_token(self, i: int) -> str:
        """Text of token id ``i`` as stored in the vocabulary (byte-level for normal tokens)."""
        return self._tokens[check_int(i, "i", 0, len(self._tokens) - 1)]

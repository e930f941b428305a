"""rANS entropy coding with static, context-conditioned frequency models.

A *model* gives, for each of ``C`` contexts, a frequency table over an alphabet of ``A``
symbols ``0 .. A-1`` whose entries sum to ``M = 2**precision``; symbol ``s`` under context
``c`` then has probability ``frequencies[c, s] / M``. `encode` turns a sequence of symbols,
each with its own context index, into a byte stream of range asymmetric numeral systems
(rANS, Duda 2013; the byte-wise variant of Giesen's ``rans_byte``) whose length approaches
the ideal code length ``sum(-log2(p))`` (`ideal_bits`); `decode` inverts it. This is the
variable-length storage/transfer path: it is sequential and stays off the attention hot path.

The decoder must know every symbol's context *before* decoding the stream, and the number
of symbols: both are inputs of `decode` (``contexts`` gives both). The count is not stored in
the stream. A context that depends on earlier symbols (a parity state, say) must therefore
be computable beforehand, e.g. from the position, or the stream must be split into parts
whose contexts are known once the previous part is decoded.

Coder
-----
The coder state is an integer ``x`` kept in ``[L, 256 L)`` with ``L = 2**23`` (it fits in 31
bits), renormalised one byte at a time. Encoding symbol ``s`` (frequency ``f``, cumulative
frequency ``b`` = the sum of the frequencies of the symbols below ``s`` in the same context)
first shifts out low bytes of ``x`` while ``x >= 2**(31 - precision) * f``, then sets
``x = (x // f) * M + x % f + b``. Decoding reads ``slot = x % M``, finds the symbol whose
interval ``[b, b + f)`` holds ``slot``, sets ``x = f * (x // M) + slot - b``, then shifts in
bytes (``x = 256 x + byte``) while ``x < L``. A symbol of probability 1 (``f = M``) leaves
``x`` unchanged and costs no bits. The encoder computes ``x // f`` without a division, by
Giesen's exact reciprocal multiply (`_make_encoder_table`); the result is the same.
``precision`` is at most 16. Each symbol costs at most
``-log2(f / M) + log2(1 + 2**(precision - 23))`` bits (the second term is ``0.0028`` bits at
the default precision 14; see `stream_bound`).

rANS is last-in first-out: the encoder processes the symbols from last to first, so the
decoder emits them first to last. ``K`` *lanes* (independent states, default 4, at most as
many as there are symbols) are interleaved: symbol ``i`` is coded with lane ``i % K``, and all
lanes push to and pop from the same byte stream. Independent lanes let the CPU overlap the
dependency chains of consecutive symbols; they cost 4 bytes each in the stream.

Stream format
-------------
=============  ==========  ==============================================================
offset         size        field
=============  ==========  ==============================================================
0              1           ``K``: number of lanes, 1 .. ``min(32, max(n, 1))``
1 + 4 j        4 (uint32)  final encoder state of lane ``j`` (``j = 0 .. K-1``),
                           little-endian; the decoder's initial state; in ``[2**23, 2**31)``
1 + 4 K        rest        renormalisation bytes, in the order the decoder reads them
=============  ==========  ==============================================================

The decoder starts each lane from its stored state and decodes symbols ``i = 0 .. n-1``
(lane ``i % K``), reading bytes from offset ``1 + 4 K`` on as the renormalisation asks. A
stream of ``n`` symbols is valid only if decoding consumes every byte exactly and leaves
every lane in the encoder's initial state ``L = 2**23``; `decode` checks both and raises
``ValueError`` otherwise. A truncated stream (any strict prefix) or one with trailing bytes
is always caught. A corrupted byte usually is, but not always: the coder adds no redundancy
beyond the final-state check, so a corruption that, say, turns a symbol into another of the
same frequency at the same offset in its interval, or any change that yields another valid
stream, decodes silently to other symbols. Integrity needs a checksum around the stream (the
container's SHA-256). The format is canonical: a stream that `decode` accepts is byte for
byte what `encode` writes for the decoded symbols with ``lanes=K``.

The stream length is ``1 + 4 K + E`` bytes, where ``E``, the number of renormalisation
bytes, satisfies ``8 E <= ideal_bits + n * log2(1 + 2**(precision - 23))`` (each lane's state
starts at ``L``, ends at ``>= L`` and its ``log2`` grows by at most that per symbol; proof in
`stream_bound`). Zero symbols encode to ``01 00 00 80 00`` (one lane in state ``L``).

Model format
------------
`Model.to_bytes`: byte 0 is ``precision`` (1 .. 16); then ``A`` and ``C`` as unsigned
LEB128 varints (7 bits a byte, least significant group first, high bit set on every byte
but the last); then the ``C * A`` frequencies, context by context and within a context symbol
by symbol, each as an LEB128 varint (one byte below 128, two below 16384, three up to
``2**16``). Varints must be minimal (no redundant ``0x80`` continuation bytes) so each model
has exactly one serialised form, of `Model.nbytes` bytes. A row either sums to ``M`` or is
all zeros (a context never observed: nothing can be coded under it).

Normalisation
-------------
`build_model` turns the counts of one context into frequencies summing to ``M``
deterministically: each observed symbol gets ``max(1, floor(count * M / total))``; if the sum
falls short of ``M``, the shortfall (fewer than the number of observed symbols) goes one unit
each to the observed symbols with the largest remainders ``count * M - f * total`` (ties:
smaller symbol first); if the floor of 1 pushed it above ``M``, the excess is taken one unit
at a time from the currently largest frequency (ties: smaller symbol first), which never
drops below 1. Unobserved symbols get 0. All arithmetic is on integers.

Examples
--------
>>> import numpy as np
>>> from latkv.entropy import build_model, decode, encode, ideal_bits, stream_bound
>>> rng = np.random.default_rng(0)
>>> contexts = rng.integers(0, 2, size=1000)
>>> symbols = np.minimum(rng.geometric(0.5 + 0.3 * contexts), 8) - 1
>>> model = build_model(symbols, contexts, alphabet=8, num_contexts=2)
>>> stream = encode(symbols, contexts, model)
>>> bool(np.array_equal(decode(stream, contexts, model), symbols))
True
>>> bits = ideal_bits(symbols, contexts, model)
>>> len(stream) <= stream_bound(len(symbols), bits, model.precision)
True
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numba import njit

from latkv.checks import check_int

__all__ = ["Model", "build_model", "decode", "decode_integers", "encode", "encode_integers",
           "ideal_bits", "stream_bound"]

STATE_BITS = 23
STATE_LOW = 1 << STATE_BITS  # L: the encoder's initial and the decoder's final state
STATE_HIGH = STATE_LOW << 8  # states lie in [L, 256 L) = [2**23, 2**31)
MAX_PRECISION = 16
MAX_ALPHABET = 1 << 16
MAX_LANES = 32
DEFAULT_LANES = 4
DEFAULT_PRECISION = 14


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _encode_kernel(symbols, contexts, table, lanes, out):
    """rANS-encode into the tail of ``out``; return the offset of the first byte written.

    ``symbols``, ``contexts``: (n,) int64, checked; ``table``: (C, A, 5) int64 from
    `_make_encoder_table`, used only at (context, symbol) pairs of nonzero frequency; ``out``:
    uint8 with room for every byte (``2 n + 1 + 4 lanes`` suffices: a symbol shifts out at
    most ``ceil(precision / 8) <= 2`` bytes). Writes the stream (lane count, states,
    renormalisation bytes) at ``out[pos:]``. Symbol ``i`` uses lane ``i % lanes``. Returns
    -1 if a symbol has frequency 0 in its context.
    """
    n = symbols.shape[0]
    states = np.full(lanes, STATE_LOW, dtype=np.int64)
    pos = out.shape[0]
    lane = (n - 1) % lanes if n else 0
    for i in range(n - 1, -1, -1):
        c = contexts[i]
        s = symbols[i]
        x = states[lane]
        x_max = table[c, s, 0]
        if x_max == 0:  # frequency 0: the caller finds and names the first such symbol
            return -1
        while x >= x_max:
            pos -= 1
            out[pos] = np.uint8(x & 0xFF)
            x >>= 8
        # x // f by reciprocal (exact for x < 2**31), then x' = x // f * M + x % f + b
        # = x + b + (x // f) * (M - f); for f = 1 the quotient is x - 1 and bias has M - 1
        q = ((x * table[c, s, 1]) >> 32) >> table[c, s, 2]
        states[lane] = x + table[c, s, 3] + q * table[c, s, 4]
        lane = lane - 1 if lane else lanes - 1
    for lane in range(lanes - 1, -1, -1):
        x = states[lane]
        for k in range(3, -1, -1):
            pos -= 1
            out[pos] = np.uint8((x >> (8 * k)) & 0xFF)
    pos -= 1
    out[pos] = np.uint8(lanes)
    return pos


def _make_encoder_table(
    frequencies: np.ndarray, cumulative: np.ndarray, precision: int
) -> np.ndarray:
    """(C, A, 5) int64: per (context, symbol) ``x_max, rcp, rcp_shift, bias, M - f``.

    Giesen's division-free rANS encoder (``rans_byte.h``): for ``f >= 2`` with
    ``2**(k-1) < f <= 2**k``, ``rcp = ceil(2**(k + 31) / f)`` and ``rcp_shift = k - 1`` make
    ``((x * rcp) >> 32) >> rcp_shift == x // f`` for every ``0 <= x < 2**31``, and
    ``bias = b``; for ``f = 1``, ``rcp = 2**32 - 1``, ``rcp_shift = 0`` give ``x - 1`` for
    ``1 <= x < 2**31`` (states are never 0) and ``bias = b + M - 1`` makes up for it.
    ``x_max = 2**(31 - precision) * f``. Entries of frequency 0 are zeros (the kernel stops
    there). The products stay below ``2**63``. ``tests/test_entropy.py`` checks the update
    against the division for every ``f`` at several precisions.
    """
    total = 1 << precision
    f = frequencies.astype(np.int64)
    b = cumulative[:, :-1].astype(np.int64)
    shift = np.zeros_like(f)
    for k in range(MAX_PRECISION + 1):
        shift += f > (1 << k)  # ceil(log2 f) for f >= 1
    big = f >= 2
    rcp = np.where(big, ((1 << (shift + 31)) + f - 1) // np.maximum(f, 1), (1 << 32) - 1)
    table = np.stack(
        [
            ((STATE_LOW >> precision) << 8) * f,
            rcp,
            np.where(big, shift - 1, 0),
            np.where(big, b, b + total - 1),
            total - f,
        ],
        axis=-1,
    )
    table[f == 0] = 0
    return np.ascontiguousarray(table)


# decode status codes
_OK = 0
_TRUNCATED = 1
_TRAILING = 2
_BAD_FINAL_STATE = 3


@njit(cache=True)
def _decode_kernel(data, states, contexts, freq, cum, table, precision, out):
    """rANS-decode ``out.shape[0]`` symbols; return ``(status, where)``.

    ``data``: (nbytes,) uint8, the whole stream; ``states``: (K,) int64, the lanes' initial
    states (read and checked from the header); ``contexts``: (n,) int64, checked to select
    non-empty rows; ``table``: (C, M) uint16, slot -> symbol. Renormalisation bytes are read
    from offset ``1 + 4 K``. Status `_TRUNCATED` with ``where`` = the symbol that needed a
    byte past the end; `_TRAILING` with ``where`` = bytes left over; `_BAD_FINAL_STATE` with
    ``where`` = the lane. Never reads outside ``data`` and runs ``O(n + nbytes)`` steps.
    """
    n = out.shape[0]
    lanes = states.shape[0]
    size = data.shape[0]
    pos = 1 + 4 * lanes
    mask = (1 << precision) - 1
    lane = 0  # i % lanes, kept as a counter
    for i in range(n):
        c = contexts[i]
        x = states[lane]
        slot = x & mask
        s = np.int64(table[c, slot])
        x = freq[c, s] * (x >> precision) + slot - cum[c, s]
        while x < STATE_LOW:
            if pos >= size:
                return _TRUNCATED, i
            x = (x << 8) | np.int64(data[pos])
            pos += 1
        states[lane] = x
        out[i] = s
        lane += 1
        if lane == lanes:
            lane = 0
    if pos != size:
        return _TRAILING, size - pos
    for lane in range(lanes):
        if states[lane] != STATE_LOW:
            return _BAD_FINAL_STATE, lane
    return _OK, 0


# --------------------------------------------------------------------------- checks


def _check_indices(x: Any, name: str, bound: int, bound_name: str) -> np.ndarray:
    """A 1-D integer NumPy array with values in ``[0, bound)``, as int64."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x) if len(x) else np.empty(0, dtype=np.int64)
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a 1-D NumPy integer array, got {type(x).__name__}"
        )
    if x.dtype.kind not in "ui":
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size:
        low, high = x.min(), x.max()
        if low < 0:
            at = int(np.argmax(x < 0))
            raise ValueError(f"{name} must be >= 0, got {name}[{at}] = {int(x[at])}")
        if high >= bound:
            at = int(np.argmax(x >= bound))
            raise ValueError(
                f"{name} must be < {bound_name} = {bound}, got {name}[{at}] = {int(x[at])}"
            )
    return x.astype(np.int64, copy=False)


def _check_pair(symbols: Any, contexts: Any, model: Model) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(model, Model):
        raise TypeError(f"model must be a latkv.entropy.Model, got {type(model).__name__}")
    symbols = _check_indices(symbols, "symbols", model.alphabet, "model.alphabet")
    contexts = _check_indices(contexts, "contexts", model.num_contexts, "model.num_contexts")
    if symbols.shape != contexts.shape:
        raise ValueError(
            f"symbols and contexts must have the same length, got {symbols.shape[0]} "
            f"and {contexts.shape[0]}"
        )
    return symbols, contexts


def _check_codable(symbols: np.ndarray, contexts: np.ndarray, model: Model) -> None:
    """Every (context, symbol) pair must have a nonzero frequency."""
    if symbols.size == 0:
        return
    zero = model.frequencies[contexts, symbols] == 0
    if zero.any():
        at = int(np.argmax(zero))
        raise ValueError(
            f"symbols[{at}] = {int(symbols[at])} has frequency 0 under context "
            f"{int(contexts[at])} in the model (never observed when the model was built); "
            "it cannot be coded"
        )


# --------------------------------------------------------------------------- varints


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """LEB128 length of each value (values < 2**21: 1 to 3 bytes)."""
    return 1 + (values >= 1 << 7).astype(np.int64) + (values >= 1 << 14).astype(np.int64)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int, name: str, limit: int) -> tuple[int, int]:
    """Read one minimal LEB128 varint at ``pos``; return (value, next position)."""
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= len(data):
            raise ValueError(f"model bytes are truncated inside {name} (at byte {start})")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if value > limit or shift > 35:
            raise ValueError(f"model bytes: {name} exceeds {limit} (at byte {start})")
    if pos - start > 1 and byte == 0:
        raise ValueError(f"model bytes: {name} is not a minimal varint (at byte {start})")
    if value > limit:
        raise ValueError(f"model bytes: {name} = {value} exceeds {limit}")
    return value, pos


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, eq=False)
class Model:
    """A static frequency model: one table of symbol frequencies per context.

    Attributes
    ----------
    frequencies : ndarray, shape (num_contexts, alphabet), dtype uint32
        ``frequencies[c, s] / 2**precision`` is the probability of symbol ``s`` under
        context ``c``. Each row sums to exactly ``2**precision``, or is all zeros (a context
        under which nothing can be coded). A symbol of frequency 0 cannot be coded in its
        context. Stored as a read-only copy.
    precision : int
        ``1 .. 16``: frequencies are in units of ``2**-precision``.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.entropy import Model
    >>> model = Model(np.array([[8, 4, 4], [0, 16, 0]], dtype=np.uint32), precision=4)
    >>> model.alphabet, model.num_contexts, model.nbytes
    (3, 2, 9)
    >>> model.cumulative.tolist()
    [[0, 8, 12, 16], [0, 0, 16, 16]]
    >>> Model.from_bytes(model.to_bytes()) == model
    True
    """

    frequencies: np.ndarray
    precision: int

    def __post_init__(self) -> None:
        precision = check_int(self.precision, "precision", 1, MAX_PRECISION)
        freq = self.frequencies
        if not isinstance(freq, np.ndarray):
            raise TypeError(
                f"frequencies must be a NumPy array, got {type(freq).__name__}"
            )
        if freq.dtype.kind not in "ui":
            raise TypeError(f"frequencies must be an integer array, got dtype {freq.dtype}")
        if freq.ndim != 2 or freq.shape[0] < 1 or freq.shape[1] < 1:
            raise ValueError(
                f"frequencies must have shape (num_contexts, alphabet) with both >= 1, "
                f"got shape {freq.shape}"
            )
        if freq.shape[1] > MAX_ALPHABET:
            raise ValueError(
                f"alphabet must be <= {MAX_ALPHABET}, got frequencies of shape {freq.shape}"
            )
        total = 1 << precision
        if freq.min() < 0 or freq.max() > total:
            raise ValueError(f"frequencies must lie in [0, 2**precision = {total}]")
        freq = freq.astype(np.uint32)  # a copy, never a view of the caller's array
        sums = freq.sum(axis=1, dtype=np.int64)
        bad = (sums != total) & (sums != 0)
        if bad.any():
            c = int(np.argmax(bad))
            raise ValueError(
                f"frequencies of context {c} sum to {int(sums[c])}; each row must sum to "
                f"2**precision = {total} (or be all zeros)"
            )
        freq.setflags(write=False)
        object.__setattr__(self, "frequencies", freq)
        object.__setattr__(self, "precision", precision)

    @property
    def alphabet(self) -> int:
        """Number of symbols ``A``: symbols are ``0 .. A-1``."""
        return int(self.frequencies.shape[1])

    @property
    def num_contexts(self) -> int:
        """Number of contexts ``C``: contexts are ``0 .. C-1``."""
        return int(self.frequencies.shape[0])

    @cached_property
    def cumulative(self) -> np.ndarray:
        """(num_contexts, alphabet + 1) uint32: ``cumulative[c, s] = sum(frequencies[c, :s])``.

        Read-only; symbol ``s`` under context ``c`` owns the slots
        ``[cumulative[c, s], cumulative[c, s + 1])`` of ``[0, 2**precision)``.
        """
        cum = np.zeros((self.num_contexts, self.alphabet + 1), dtype=np.uint32)
        np.cumsum(self.frequencies, axis=1, out=cum[:, 1:])
        cum.setflags(write=False)
        return cum

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The frequencies and cumulative frequencies as int64, for the decode kernel."""
        return self.frequencies.astype(np.int64), self.cumulative.astype(np.int64)

    @cached_property
    def _has_empty_context(self) -> bool:
        """Whether some context has a row of zeros (nothing codable under it)."""
        return bool((self.frequencies.sum(axis=1) == 0).any())

    @cached_property
    def _encoder_table(self) -> np.ndarray:
        """(C, A, 5) int64: `_make_encoder_table` of this model, for the encode kernel."""
        return _make_encoder_table(self.frequencies, self.cumulative, self.precision)

    @cached_property
    def _decode_table(self) -> np.ndarray:
        """(num_contexts, 2**precision) uint16: the symbol whose interval holds each slot.

        ``2 * num_contexts * 2**precision`` bytes. Rows of empty contexts are zeros (never
        used: `decode` refuses such contexts before decoding).
        """
        total = 1 << self.precision
        table = np.zeros((self.num_contexts, total), dtype=np.uint16)
        full = self.frequencies.sum(axis=1, dtype=np.int64) == total
        symbols = np.tile(np.arange(self.alphabet, dtype=np.uint16), int(full.sum()))
        table[full] = np.repeat(symbols, self.frequencies[full].ravel()).reshape(-1, total)
        return table

    @property
    def nbytes(self) -> int:
        """Exact length of `to_bytes`: ``1 + len(varint(A)) + len(varint(C))`` plus one
        1-, 2- or 3-byte varint per frequency.

        Examples
        --------
        Frequencies ``200`` (two varint bytes) and ``56`` (one), after 3 header bytes:

        >>> import numpy as np
        >>> from latkv.entropy import Model
        >>> model = Model(np.array([[200, 56]], dtype=np.uint32), precision=8)
        >>> model.nbytes, len(model.to_bytes())
        (6, 6)
        """
        lengths = _varint_lengths(self.frequencies.astype(np.int64))
        return (
            1
            + len(_varint(self.alphabet))
            + len(_varint(self.num_contexts))
            + int(lengths.sum())
        )

    def to_bytes(self) -> bytes:
        """The serialised model (format in the module docstring), `nbytes` long.

        Returns
        -------
        bytes
            ``precision``, varint ``alphabet``, varint ``num_contexts``, then the
            frequencies as varints, context-major.

        Examples
        --------
        >>> import numpy as np
        >>> from latkv.entropy import Model
        >>> Model(np.array([[200, 56]], dtype=np.uint32), precision=8).to_bytes().hex(" ")
        '08 02 01 c8 01 38'
        """
        values = self.frequencies.astype(np.int64).ravel()
        lengths = _varint_lengths(values)
        # byte k of a varint holds bits 7k .. 7k+6, with 0x80 on all but its last byte
        ends = np.cumsum(lengths)
        body = np.empty(int(ends[-1]), dtype=np.uint8)
        starts = ends - lengths
        for k in range(3):
            has = lengths > k
            more = (lengths > k + 1).astype(np.int64) << 7
            body[starts[has] + k] = (((values[has] >> (7 * k)) & 0x7F) | more[has]).astype(
                np.uint8
            )
        header = (
            bytes([self.precision]) + _varint(self.alphabet) + _varint(self.num_contexts)
        )
        return header + body.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Model:
        """Read a model written by `to_bytes`, checking it completely.

        Parameters
        ----------
        data : bytes-like
            Exactly the serialised model: trailing bytes are an error.

        Raises
        ------
        ValueError
            Truncated or trailing bytes, a precision outside 1 .. 16, an alphabet outside
            1 .. 65536, no contexts, a non-minimal varint, a frequency above
            ``2**precision``, or a row summing to neither ``2**precision`` nor 0.

        Examples
        --------
        >>> from latkv.entropy import Model
        >>> Model.from_bytes(bytes.fromhex("08 02 01 c8 01 38")).frequencies.tolist()
        [[200, 56]]
        >>> Model.from_bytes(bytes.fromhex("08 02 01 c8 01 37"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: frequencies of context 0 sum to 255; each row must sum to 2**precision ...
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise ValueError("model bytes are empty")
        precision = data[0]
        if not 1 <= precision <= MAX_PRECISION:
            raise ValueError(f"model bytes: precision must be in [1, 16], got {precision}")
        alphabet, pos = _read_varint(data, 1, "alphabet", MAX_ALPHABET)
        num_contexts, pos = _read_varint(data, pos, "num_contexts", len(data))
        if alphabet < 1 or num_contexts < 1:
            raise ValueError(
                f"model bytes: alphabet and num_contexts must be >= 1, got {alphabet} "
                f"and {num_contexts}"
            )
        count = alphabet * num_contexts
        body = np.frombuffer(data, dtype=np.uint8, offset=pos)
        if body.size < count:  # every varint takes at least one byte
            raise ValueError(
                f"model bytes are truncated: {count} frequencies need at least {count} "
                f"bytes, {body.size} left"
            )
        last = np.flatnonzero(body < 0x80)  # the final byte of every varint
        if last.size < count:
            raise ValueError(f"model bytes are truncated: fewer than {count} frequencies")
        last = last[:count]
        if int(last[-1]) + 1 != body.size:
            extra = body.size - int(last[-1]) - 1
            raise ValueError(f"model bytes have {extra} trailing bytes")
        lengths = np.diff(last, prepend=-1)
        if lengths.max() > 3:
            raise ValueError("model bytes: a frequency varint is longer than 3 bytes")
        if np.any((lengths > 1) & (body[last] == 0)):
            raise ValueError("model bytes: a frequency is not a minimal varint")
        starts = last + 1 - lengths
        values = np.zeros(count, dtype=np.int64)
        for k in range(3):
            has = lengths > k
            values[has] |= (body[starts[has] + k].astype(np.int64) & 0x7F) << (7 * k)
        if values.max() > 1 << precision:
            raise ValueError(
                f"model bytes: a frequency exceeds 2**precision = {1 << precision}"
            )
        return cls(values.reshape(num_contexts, alphabet).astype(np.uint32), precision)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Model):
            return NotImplemented
        return self.precision == other.precision and np.array_equal(
            self.frequencies, other.frequencies
        )

    def __hash__(self) -> int:
        return hash((self.precision, self.frequencies.shape, self.frequencies.tobytes()))


def _quantize_counts(counts: np.ndarray, precision: int) -> np.ndarray:
    """Counts (C, A) int64 -> frequencies (C, A) uint32, each observed row summing to 2**p.

    The deterministic normalisation of the module docstring.
    """
    total_freq = 1 << precision
    out = np.zeros(counts.shape, dtype=np.uint32)
    for c, row in enumerate(counts):
        total = int(row.sum())
        if total == 0:
            continue
        observed = np.flatnonzero(row)
        if observed.size > total_freq:
            raise ValueError(
                f"context {c} has {observed.size} distinct symbols, more than "
                f"2**precision = {total_freq}; raise precision"
            )
        # python ints: count * M cannot overflow
        counts_obs = [int(v) for v in row[observed]]
        freq = [max(1, v * total_freq // total) for v in counts_obs]
        diff = total_freq - sum(freq)
        if diff > 0:
            # diff < number of observed symbols: one unit each, largest remainder first
            order = sorted(
                range(len(freq)), key=lambda k: (-(counts_obs[k] * total_freq - freq[k] * total), k)
            )
            for k in order[:diff]:
                freq[k] += 1
        elif diff < 0:
            heap = [(-f, k) for k, f in enumerate(freq)]
            heapq.heapify(heap)
            for _ in range(-diff):
                f, k = heapq.heappop(heap)
                freq[k] = -f - 1  # the sum exceeds M >= #observed, so the largest is >= 2
                heapq.heappush(heap, (f + 1, k))
        out[c, observed] = freq
    return out


def build_model(
    symbols: Any,
    contexts: Any,
    alphabet: int,
    num_contexts: int,
    precision: int = DEFAULT_PRECISION,
) -> Model:
    """Count symbols per context and normalise the counts into a `Model`.

    Parameters
    ----------
    symbols : ndarray, shape (n,), integer dtype
        Values in ``[0, alphabet)``.
    contexts : ndarray, shape (n,), integer dtype
        Values in ``[0, num_contexts)``; ``contexts[i]`` is the context of ``symbols[i]``.
    alphabet : int
        Number of symbols, ``1 .. 65536``.
    num_contexts : int
        Number of contexts, ``>= 1``.
    precision : int, default 14
        ``1 .. 16``: each observed context's frequencies sum to ``2**precision``. Higher
        precision follows the counts more closely (less loss against the empirical entropy)
        at the price of larger tables (``2 * num_contexts * 2**precision`` bytes to decode).

    Returns
    -------
    Model
        Every observed (context, symbol) pair has frequency ``>= 1``, every unobserved one
        0; a context with no symbols gets a row of zeros. The normalisation (module
        docstring) is deterministic and exact on integers.

    Raises
    ------
    ValueError
        Out-of-range values, mismatched lengths, or a context with more distinct symbols than
        ``2**precision``.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.entropy import build_model
    >>> symbols = np.array([0, 0, 0, 1, 2, 0, 1, 0])
    >>> contexts = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    >>> build_model(symbols, contexts, alphabet=3, num_contexts=3, precision=4).frequencies
    array([[10,  3,  3],
           [11,  5,  0],
           [ 0,  0,  0]], dtype=uint32)
    """
    alphabet = check_int(alphabet, "alphabet", 1, MAX_ALPHABET)
    num_contexts = check_int(num_contexts, "num_contexts", 1)
    precision = check_int(precision, "precision", 1, MAX_PRECISION)
    symbols = _check_indices(symbols, "symbols", alphabet, "alphabet")
    contexts = _check_indices(contexts, "contexts", num_contexts, "num_contexts")
    if symbols.shape != contexts.shape:
        raise ValueError(
            f"symbols and contexts must have the same length, got {symbols.shape[0]} "
            f"and {contexts.shape[0]}"
        )
    counts = np.bincount(
        contexts * alphabet + symbols, minlength=num_contexts * alphabet
    ).reshape(num_contexts, alphabet)
    return Model(_quantize_counts(counts, precision), precision)


# --------------------------------------------------------------------------- coding


def encode(symbols: Any, contexts: Any, model: Model, *, lanes: int = DEFAULT_LANES) -> bytes:
    """rANS-encode ``symbols``, each under its context, into a byte stream.

    Parameters
    ----------
    symbols : ndarray, shape (n,), integer dtype
        Values in ``[0, model.alphabet)``, each with a nonzero frequency in its context.
    contexts : ndarray, shape (n,), integer dtype
        Values in ``[0, model.num_contexts)``. The decoder needs the same array.
    model : Model
        The frequency tables; the decoder needs the same model.
    lanes : int, default 4
        Interleaved coder states, ``1 .. 32``; the stream uses ``min(lanes, max(n, 1))``.

    Returns
    -------
    bytes
        The stream (format in the module docstring): ``1 + 4 K + E`` bytes with ``K`` the
        lanes used and ``8 E <= ideal_bits + n * log2(1 + 2**(precision - 23))`` (see
        `stream_bound`).

    Raises
    ------
    TypeError
        Non-integer arrays or a model that is not a `Model`.
    ValueError
        Values out of range, mismatched lengths, or a symbol of frequency 0 in its context
        (the message names the position, the symbol and the context).

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.entropy import Model, encode
    >>> model = Model(np.array([[8, 8]], dtype=np.uint32), precision=4)
    >>> encode(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), model).hex(" ")
    '01 00 00 80 00'
    >>> bits = np.array([1, 0, 1, 1, 0, 0, 1, 0] * 4)  # 32 symbols of probability 1/2
    >>> len(encode(bits, np.zeros(32, dtype=np.int64), model, lanes=1))  # 1 + 4 + 32 / 8
    9
    """
    symbols, contexts = _check_pair(symbols, contexts, model)
    lanes = check_int(lanes, "lanes", 1, MAX_LANES)
    n = symbols.shape[0]
    lanes = min(lanes, max(n, 1))
    out = np.empty(2 * n + 1 + 4 * lanes, dtype=np.uint8)
    pos = _encode_kernel(symbols, contexts, model._encoder_table, lanes, out)
    if pos < 0:
        _check_codable(symbols, contexts, model)  # raises, naming the first such symbol
    return out[pos:].tobytes()


def _as_stream(data: Any) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(
                f"data must be bytes or a 1-D uint8 array, got dtype {data.dtype} "
                f"and shape {data.shape}"
            )
        return np.ascontiguousarray(data)
    raise TypeError(f"data must be bytes or a 1-D uint8 array, got {type(data).__name__}")


def decode(data: Any, contexts: Any, model: Model) -> np.ndarray:
    """Decode a stream written by `encode` back into its symbols.

    Parameters
    ----------
    data : bytes, bytearray, memoryview or ndarray of shape (nbytes,) and dtype uint8
        Exactly the stream: nothing before it, nothing after it.
    contexts : ndarray, shape (n,), integer dtype
        The contexts given to `encode`; their number is the number of symbols decoded.
    model : Model
        The model given to `encode`.

    Returns
    -------
    ndarray, shape (n,), dtype int64
        The symbols.

    Raises
    ------
    ValueError
        The stream is shorter than its header, names 0 lanes or more than
        ``min(32, max(n, 1))``, holds a state
        outside ``[2**23, 2**31)``, ends before ``n`` symbols are decoded, has bytes left
        after them, or does not leave every lane in the initial state ``2**23`` (a corrupted
        stream, or a different model, contexts or count than the encoder's); or a context
        has no codable symbol in the model.
    TypeError
        ``data`` is not bytes-like or a uint8 array; ``contexts`` is not an integer array.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.entropy import Model, decode
    >>> model = Model(np.array([[8, 8]], dtype=np.uint32), precision=4)
    >>> decode(bytes.fromhex("01 00 00 80 00"), np.zeros(0, dtype=np.int64), model)
    array([], dtype=int64)
    >>> decode(bytes.fromhex("01 00 00 80 00 00"), np.zeros(0, dtype=np.int64), model)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: stream has 1 trailing bytes after the last symbol ...
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a latkv.entropy.Model, got {type(model).__name__}")
    data = _as_stream(data)
    contexts = _check_indices(contexts, "contexts", model.num_contexts, "model.num_contexts")
    n = contexts.shape[0]
    if data.size < 1:
        raise ValueError("stream is empty: it needs at least the 1-byte lane count")
    lanes = int(data[0])
    if not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"stream names {lanes} lanes; must be in [1, {MAX_LANES}]")
    if lanes > max(n, 1):
        raise ValueError(
            f"stream names {lanes} lanes but codes {n} symbols; the encoder uses at most "
            f"max(n, 1) = {max(n, 1)} (a corrupted stream, or a different symbol count)"
        )
    if data.size < 1 + 4 * lanes:
        raise ValueError(
            f"stream is truncated: {data.size} bytes, but {lanes} lanes need a "
            f"{1 + 4 * lanes}-byte header"
        )
    states = data[1 : 1 + 4 * lanes].copy().view("<u4").astype(np.int64)
    bad = (states < STATE_LOW) | (states >= STATE_HIGH)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(
            f"stream: state of lane {j} is {int(states[j])}, outside [2**23, 2**31) "
            "(a corrupted stream)"
        )
    if n and model._has_empty_context:
        sums = model.frequencies.sum(axis=1, dtype=np.int64)
        empty = sums[contexts] == 0
        if empty.any():
            at = int(np.argmax(empty))
            raise ValueError(
                f"contexts[{at}] = {int(contexts[at])} has no symbol of nonzero frequency "
                "in the model; nothing can be decoded under it"
            )
    freq, cum = model._tables
    table = model._decode_table if n else np.zeros((1, 1), dtype=np.uint16)
    out = np.empty(n, dtype=np.int64)
    status, where = _decode_kernel(
        data, states, contexts, freq, cum, table, model.precision, out
    )
    if status == _TRUNCATED:
        raise ValueError(
            f"stream is truncated: it ends while decoding symbol {where} of {n}"
        )
    if status == _TRAILING:
        raise ValueError(
            f"stream has {where} trailing bytes after the last symbol (a corrupted "
            "stream, or a different model or symbol count)"
        )
    if status == _BAD_FINAL_STATE:
        raise ValueError(
            f"stream does not end in the initial state (lane {where}): a corrupted "
            "stream, or a different model, contexts or symbol count than the encoder's"
        )
    return out


def encode_integers(values: Any) -> tuple[bytes, Model, int]:
    """Signed integers under one context (memoryless): ``(stream, model, offset)``.

    The coder of entropy-coded scalar quantization: symbol ``v + offset`` with
    ``offset = max(1, max |v|)`` over an alphabet of ``2 offset + 1`` (at most 65,536), a model
    fitted to these values. Store ``len(stream) + model.nbytes`` bytes (and ``offset``).

    Parameters
    ----------
    values : ndarray, any shape, integer dtype
        Within ``+-32767``; coded in C order.

    Returns
    -------
    stream : bytes
        `encode`'s stream of the symbols ``values + offset`` (context 0).
    model : Model
        One context over ``2 offset + 1`` symbols, built from these values (`build_model`).
    offset : int
        ``max(1, max |v|)`` (1 for no values).

    Raises
    ------
    TypeError
        ``values`` is not an integer array.
    ValueError
        ``max |v| > 32767``.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.entropy import decode_integers, encode_integers
    >>> values = np.array([[0, -1, 2], [0, 0, 1]])
    >>> stream, model, offset = encode_integers(values)
    >>> offset, model.alphabet, model.num_contexts
    (2, 5, 1)
    >>> decode_integers(stream, model, offset, values.size).reshape(values.shape)
    array([[ 0, -1,  2],
           [ 0,  0,  1]])
    """
    values = np.asarray(values)
    if values.dtype.kind not in "iu":
        raise TypeError(f"values must be an integer array, got dtype {values.dtype}")
    flat = values.astype(np.int64).ravel()
    offset = max(1, int(np.abs(flat).max())) if flat.size else 1
    if 2 * offset + 1 > 1 << 16:
        raise ValueError(f"values must lie within +-32767 (an alphabet of at most 65,536 "
                         f"symbols), got max |v| = {offset}")
    symbols = flat + offset
    contexts = np.zeros_like(symbols)
    model = build_model(symbols, contexts, 2 * offset + 1, 1)
    return encode(symbols, contexts, model), model, offset


def decode_integers(data: Any, model: Model, offset: int, count: int) -> np.ndarray:
    """The ``count`` int64 values of `encode_integers` (flat, in C order).

    Parameters
    ----------
    data : bytes, bytearray, memoryview or ndarray of shape (nbytes,) and dtype uint8
        The stream of `encode_integers`.
    model : Model
        Its model.
    offset : int
        Its offset.
    count : int
        The number of values encoded (not stored in the stream).

    Returns
    -------
    ndarray, shape (count,), dtype int64

    Raises
    ------
    ValueError
        As `decode` (a different count, model or a corrupted stream).

    Examples
    --------
    A constant array costs no renormalisation bytes: its one symbol has probability 1.

    >>> import numpy as np
    >>> from latkv.entropy import decode_integers, encode_integers
    >>> stream, model, offset = encode_integers(np.full(100, -3, dtype=np.int8))
    >>> len(stream)  # 1 + 4 lanes * 4 bytes
    17
    >>> values = decode_integers(stream, model, offset, 100)
    >>> values.dtype, bool((values == -3).all())
    (dtype('int64'), True)
    """
    count = check_int(count, "count", 0)
    return decode(data, np.zeros(count, np.int64), model).astype(np.int64) - int(offset)


def ideal_bits(symbols: Any, contexts: Any, model: Model) -> float:
    """The ideal code length of ``symbols`` under ``model``: ``sum(-log2(f / 2**precision))``.

    Parameters
    ----------
    symbols, contexts : ndarray, shape (n,), integer dtype
        As for `encode`.
    model : Model

    Returns
    -------
    float
        Bits; `encode`'s stream approaches ``ideal_bits / 8`` bytes plus its header
        (`stream_bound`).

    Raises
    ------
    ValueError
        As `encode` (a symbol of frequency 0 would cost infinitely many bits).

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.entropy import Model, ideal_bits
    >>> model = Model(np.array([[8, 4, 4]], dtype=np.uint32), precision=4)
    >>> ideal_bits(np.array([0, 1, 2]), np.zeros(3, dtype=np.int64), model)
    5.0
    """
    symbols, contexts = _check_pair(symbols, contexts, model)
    _check_codable(symbols, contexts, model)
    if symbols.size == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        cost = model.precision - np.log2(model.frequencies.astype(np.float64))
    counts = np.bincount(
        contexts * model.alphabet + symbols, minlength=model.num_contexts * model.alphabet
    )
    used = counts > 0
    return float(np.dot(counts[used], cost.ravel()[used]))


def stream_bound(n: int, bits: float, precision: int, lanes: int = DEFAULT_LANES) -> int:
    """Upper bound on the length in bytes of `encode`'s stream for ``n`` symbols.

    ``1 + 4 K + floor((bits + n * log2(1 + 2**(precision - 23))) / 8)`` with
    ``K = min(lanes, max(n, 1))`` and ``bits`` = `ideal_bits` of the symbols.

    Why: each lane starts in state ``L = 2**23`` and ends in a state ``>= L``. Encoding a
    symbol of frequency ``f`` takes a state ``x >= 2**(23 - precision) * f`` (after
    renormalisation) to at most ``(x // f + 1) * M``, i.e. ``log2(x)`` grows by at most
    ``-log2(f / M) + log2(1 + 2**(precision - 23))``; shifting out a byte lowers
    ``log2(x)`` by at least 8. So ``8 E`` (the renormalisation bytes) is at most the sum of
    the growths, and each lane's 4 flushed bytes, plus the lane count, make up the rest.

    Examples
    --------
    >>> from latkv.entropy import stream_bound
    >>> stream_bound(0, 0.0, 14)
    5
    >>> stream_bound(1000, 1000.0, 14)
    142
    """
    n = check_int(n, "n", 0)
    precision = check_int(precision, "precision", 1, MAX_PRECISION)
    lanes = min(check_int(lanes, "lanes", 1, MAX_LANES), max(n, 1))
    slack = n * math.log2(1.0 + 2.0 ** (precision - STATE_BITS))
    # a relative margin covers the rounding of a float sum of many terms in ``bits``
    return 1 + 4 * lanes + int(math.floor((bits + slack) * (1.0 + 1e-12) / 8.0 + 1e-9))

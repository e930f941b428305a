"""rANS entropy coder: round trips, the documented byte format, the length bound, and
robustness against corrupted streams and models."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from latkv import entropy
from latkv.entropy import (
    MAX_LANES,
    STATE_LOW,
    Model,
    _make_encoder_table,
    build_model,
    decode,
    encode,
    ideal_bits,
    stream_bound,
)

# --------------------------------------------------------------------------- helpers


def reference_encode(symbols, contexts, model: Model, lanes: int = 4) -> bytes:
    """The stream format of the module docstring, written out in plain Python with divisions.

    The numba kernel (reciprocal multiplies, a preallocated buffer filled backwards) must
    produce exactly these bytes.
    """
    n = len(symbols)
    lanes = min(lanes, max(n, 1))
    precision = model.precision
    total = 1 << precision
    states = [STATE_LOW] * lanes
    emitted = bytearray()  # in the order the encoder shifts them out
    for i in reversed(range(n)):
        c, s = int(contexts[i]), int(symbols[i])
        f = int(model.frequencies[c, s])
        b = int(model.cumulative[c, s])
        x = states[i % lanes]
        while x >= ((STATE_LOW >> precision) << 8) * f:
            emitted.append(x & 0xFF)
            x >>= 8
        states[i % lanes] = (x // f) * total + x % f + b
    header = bytes([lanes]) + b"".join(x.to_bytes(4, "little") for x in states)
    return header + bytes(reversed(emitted))


def empirical_entropy_bits(symbols, contexts, alphabet, num_contexts) -> float:
    """sum over symbols of -log2(count(c, s) / count(c)): the conditional empirical entropy."""
    counts = np.bincount(contexts * alphabet + symbols, minlength=num_contexts * alphabet)
    counts = counts.reshape(num_contexts, alphabet).astype(np.float64)
    bits = 0.0
    for row in counts:
        seen = row[row > 0]
        bits -= float((seen * np.log2(seen / row.sum())).sum())
    return bits


def random_source(rng, n, alphabet, num_contexts, concentration):
    """Symbols drawn from one Dirichlet(concentration) distribution per context."""
    probs = rng.dirichlet(np.full(alphabet, concentration), size=num_contexts)
    contexts = rng.integers(0, num_contexts, size=n)
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(n)
    symbols = (u[:, None] > cdf[contexts]).sum(axis=1)
    return np.minimum(symbols, alphabet - 1).astype(np.int64), contexts.astype(np.int64)


def check_round_trip(symbols, contexts, model, lanes=4) -> bytes:
    stream = encode(symbols, contexts, model, lanes=lanes)
    assert isinstance(stream, bytes)
    decoded = decode(stream, contexts, model)
    assert decoded.dtype == np.int64 and decoded.shape == (len(symbols),)
    np.testing.assert_array_equal(decoded, symbols)
    assert stream == reference_encode(symbols, contexts, model, lanes)
    bits = ideal_bits(symbols, contexts, model)
    assert len(stream) <= stream_bound(len(symbols), bits, model.precision, lanes)
    return stream


@st.composite
def sources(draw, max_n=400):
    precision = draw(st.integers(1, 16))
    alphabet = draw(st.integers(1, min(40, 1 << precision)))
    num_contexts = draw(st.integers(1, 5))
    n = draw(st.integers(0, max_n))
    concentration = draw(st.sampled_from([0.05, 0.3, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    symbols, contexts = random_source(rng, n, alphabet, num_contexts, concentration)
    return symbols, contexts, alphabet, num_contexts, precision


# --------------------------------------------------------------------------- round trips


@given(sources(), st.integers(1, 9))
def test_round_trip_random_sources(source, lanes):
    symbols, contexts, alphabet, num_contexts, precision = source
    model = build_model(symbols, contexts, alphabet, num_contexts, precision)
    check_round_trip(symbols, contexts, model, lanes)


@given(
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2)), max_size=200),
    st.integers(3, 16),
    st.integers(1, MAX_LANES),
)
def test_round_trip_explicit_sequences(pairs, precision, lanes):
    symbols = np.array([s for s, _ in pairs], dtype=np.int64)
    contexts = np.array([c for _, c in pairs], dtype=np.int64)
    model = build_model(symbols, contexts, 8, 3, precision)
    check_round_trip(symbols, contexts, model, lanes)


@pytest.mark.parametrize("precision", [1, 2, 8, 14, 16])
@pytest.mark.parametrize("n", [1, 2, 5, 1000])
def test_probability_one_symbol_costs_nothing(precision, n):
    symbols = np.full(n, 3, dtype=np.int64)
    contexts = np.zeros(n, dtype=np.int64)
    model = build_model(symbols, contexts, 5, 1, precision)
    assert model.frequencies[0, 3] == 1 << precision
    assert ideal_bits(symbols, contexts, model) == 0.0
    stream = check_round_trip(symbols, contexts, model)
    lanes = min(4, n)
    assert len(stream) == 1 + 4 * lanes  # the header alone: every state is still L
    assert stream[1:5] == STATE_LOW.to_bytes(4, "little")


def test_near_certain_symbol():
    """One symbol of frequency 2**p - 1 and one of frequency 1, at the largest precision."""
    symbols = np.zeros(100_000, dtype=np.int64)
    symbols[77] = 1
    contexts = np.zeros_like(symbols)
    model = build_model(symbols, contexts, 2, 1, precision=16)
    assert model.frequencies.tolist() == [[65535, 1]]
    check_round_trip(symbols, contexts, model)


@pytest.mark.parametrize("precision", [10, 16])
def test_all_distinct_symbols(precision):
    alphabet = 1 << precision  # as many distinct symbols as there are slots: every f is 1
    symbols = np.random.default_rng(3).permutation(alphabet).astype(np.int64)
    contexts = np.zeros(alphabet, dtype=np.int64)
    model = build_model(symbols, contexts, alphabet, 1, precision)
    assert np.all(model.frequencies == 1)
    check_round_trip(symbols, contexts, model)
    assert ideal_bits(symbols, contexts, model) == alphabet * precision


def test_alternating_contexts_with_disjoint_supports(rng):
    n = 5000
    contexts = np.arange(n, dtype=np.int64) % 2
    symbols = np.where(contexts == 0, 0, rng.integers(1, 6, size=n))
    model = build_model(symbols, contexts, 6, 2)
    assert model.frequencies[0].tolist() == [1 << 14, 0, 0, 0, 0, 0]
    assert model.frequencies[1, 0] == 0
    check_round_trip(symbols, contexts, model)


def test_very_skewed_distribution(rng):
    symbols = np.zeros(200_000, dtype=np.int64)
    rare = rng.choice(symbols.size, size=30, replace=False)
    symbols[rare] = np.arange(1, 31)  # 30 symbols seen once, each bumped to frequency 1
    contexts = np.zeros_like(symbols)
    model = build_model(symbols, contexts, 31, 1, precision=8)
    assert model.frequencies[0].tolist() == [226] + [1] * 30
    check_round_trip(symbols, contexts, model)


@pytest.mark.parametrize("lanes", [1, 2, 4, 32])
def test_empty_and_single_symbol(lanes):
    model = Model(np.array([[3, 5], [8, 0]], dtype=np.uint32), precision=3)
    empty = np.zeros(0, dtype=np.int64)
    stream = encode(empty, empty, model, lanes=lanes)
    assert stream == bytes([1]) + STATE_LOW.to_bytes(4, "little")
    out = decode(stream, empty, model)
    assert out.dtype == np.int64 and out.shape == (0,)
    for s, c in [(0, 0), (1, 0), (0, 1)]:
        one = check_round_trip(np.array([s]), np.array([c]), model, lanes)
        assert one[0] == 1  # a single symbol uses a single lane


def test_two_million_symbols():
    """16 symbols, 8 contexts: the throughput case (timed by benchmarks, not here)."""
    rng = np.random.default_rng(7)
    n = 2_000_000
    contexts = rng.integers(0, 8, size=n)
    symbols = np.minimum(rng.geometric(0.2 + 0.08 * contexts), 16) - 1
    model = build_model(symbols, contexts, 16, 8)
    stream = encode(symbols, contexts, model)
    np.testing.assert_array_equal(decode(stream, contexts, model), symbols)
    bits = ideal_bits(symbols, contexts, model)
    assert len(stream) <= stream_bound(n, bits, model.precision)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int32, np.uint64])
def test_integer_dtypes_and_lists(dtype):
    symbols = np.array([0, 2, 1, 2, 2], dtype=dtype)
    contexts = np.array([1, 0, 1, 1, 0], dtype=dtype)
    model = build_model(symbols, contexts, 3, 2)
    stream = encode(symbols, contexts, model)
    assert stream == encode(symbols.tolist(), contexts.tolist(), model)
    np.testing.assert_array_equal(decode(stream, contexts, model), symbols.astype(np.int64))
    np.testing.assert_array_equal(decode(bytearray(stream), contexts.tolist(), model), symbols)
    np.testing.assert_array_equal(
        decode(np.frombuffer(stream, dtype=np.uint8), contexts, model), symbols
    )


def test_deterministic(rng):
    symbols, contexts = random_source(rng, 3000, 12, 4, 0.5)
    a = build_model(symbols, contexts, 12, 4)
    b = build_model(symbols.copy(), contexts.copy(), 12, 4)
    assert a == b and hash(a) == hash(b)
    assert encode(symbols, contexts, a) == encode(symbols, contexts, b)


# --------------------------------------------------------------------------- coder internals


@pytest.mark.parametrize("precision", [1, 5, 8, 14, 16])
def test_reciprocal_encoder_equals_division(precision):
    """The division-free state update is exactly (x // f) * M + x % f + b for every f."""
    total = 1 << precision
    f = np.arange(1, total + 1, dtype=np.int64)
    b = np.arange(total, dtype=np.int64) % 7  # any start works: it is only added
    cumulative = np.concatenate([b, [0]])[None, :]
    table = _make_encoder_table(f[None, :], cumulative, precision)[0]
    x_max = table[:, 0]
    assert np.array_equal(x_max, (1 << (31 - precision)) * f)
    rng = np.random.default_rng(precision)
    # renormalisation leaves x in [x_max / 256, x_max) (or in [L, x_max) untouched); check the
    # edges of the widest range where the update is exact, [1, 2**31) (x = 0 never occurs:
    # x >= x_max / 256 >= 1), and of that interval, and random points between
    lows = x_max // 256
    columns = [np.ones_like(f), lows, lows + 1, x_max - 1,
               np.full_like(f, (1 << 31) - 1), np.full_like(f, STATE_LOW)]
    columns += [rng.integers(lows, x_max) for _ in range(16)]
    columns += [rng.integers(1, 1 << 31, size=f.size) for _ in range(4)]
    for x in columns:
        q = ((x * table[:, 1]) >> 32) >> table[:, 2]
        fast = x + table[:, 3] + q * table[:, 4]
        np.testing.assert_array_equal(fast, (x // f) * total + x % f + b)


def test_stream_layout_by_hand():
    """Two symbols of probability 1/2 and 1/4 with one lane, worked out from the docstring."""
    model = Model(np.array([[8, 4, 4]], dtype=np.uint32), precision=4)
    # encode symbol 1 (f=4, b=8) then symbol 0 (f=8, b=0), both from L = 2**23:
    # x_max(f=4) = 2**27 * 4 > L, so x = (L // 4) * 16 + 0 + 8 = 2**25 + 8;
    # x_max(f=8) = 2**30 > x, so x = (x // 8) * 16 + x % 8 + 0 = 2**26 + 16
    stream = encode(np.array([0, 1]), np.array([0, 0]), model, lanes=1)
    assert stream == bytes([1]) + (2**26 + 16).to_bytes(4, "little")
    assert ideal_bits(np.array([0, 1]), np.array([0, 0]), model) == 3.0


# --------------------------------------------------------------------------- length


@given(sources(max_n=2000), st.integers(1, 8))
def test_length_bound(source, lanes):
    """len <= 1 + 4 K + (ideal_bits + n log2(1 + 2**(p - 23))) / 8, rounded down (stream_bound).

    The stream is the lane count, K flushed 4-byte states and E renormalisation bytes. Each
    lane's log2(state) starts at 23, ends >= 23, grows by at most -log2(f/M) + log2(1 +
    2**(p-23)) per symbol and falls by >= 8 per byte shifted out, so 8 E is at most the sum.
    """
    symbols, contexts, alphabet, num_contexts, precision = source
    model = build_model(symbols, contexts, alphabet, num_contexts, precision)
    stream = encode(symbols, contexts, model, lanes=lanes)
    bits = ideal_bits(symbols, contexts, model)
    used = min(lanes, max(len(symbols), 1))
    slack = len(symbols) * math.log2(1 + 2.0 ** (precision - 23))
    assert len(stream) <= 1 + 4 * used + (bits + slack) / 8 + 1e-6
    assert len(stream) <= stream_bound(len(symbols), bits, precision, lanes)


@pytest.mark.parametrize("precision", [12, 14, 16])
def test_long_geometric_source_within_one_percent_of_entropy(precision):
    rng = np.random.default_rng(11)
    n = 500_000
    contexts = rng.integers(0, 4, size=n)
    symbols = np.minimum(rng.geometric(0.15 + 0.2 * contexts), 32) - 1
    model = build_model(symbols, contexts, 32, 4, precision)
    stream = encode(symbols, contexts, model)
    np.testing.assert_array_equal(decode(stream, contexts, model), symbols)
    entropy = empirical_entropy_bits(symbols, contexts, 32, 4)
    bits = ideal_bits(symbols, contexts, model)
    assert bits >= entropy  # Gibbs: no model beats the empirical distribution on its data
    assert len(stream) <= stream_bound(n, bits, precision)
    # within 1% even counting the serialised model (about 0.1% of the stream here)
    assert 8 * (len(stream) + model.nbytes) <= 1.01 * entropy


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def coded(rng):
    symbols, contexts = random_source(rng, 600, 10, 3, 0.5)
    model = build_model(symbols, contexts, 10, 3)
    return symbols, contexts, model, encode(symbols, contexts, model)


def test_every_truncation_is_detected(coded):
    symbols, contexts, model, stream = coded
    for length in range(len(stream)):
        with pytest.raises(ValueError, match="stream"):
            decode(stream[:length], contexts, model)


def test_trailing_bytes_are_detected(coded):
    symbols, contexts, model, stream = coded
    for extra in (b"\x00", b"\xff", b"\x01\x02\x03"):
        with pytest.raises(ValueError, match="trailing"):
            decode(stream + extra, contexts, model)


def test_flipped_bytes_raise_or_decode_to_a_valid_encoding(coded):
    """A corrupted byte raises, or yields symbols whose encoding is the corrupted stream.

    rANS adds no redundancy beyond the final states, so detection is not guaranteed (a symbol
    can turn into another of the same frequency); with these frequencies, which are mostly
    distinct, nearly every flip is caught.
    """
    symbols, contexts, model, stream = coded
    caught = trials = 0
    for pos in range(len(stream)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(stream)
            bad[pos] ^= mask
            trials += 1
            try:
                out = decode(bytes(bad), contexts, model)
            except ValueError as error:
                assert str(error).startswith("stream")
                caught += 1
                continue
            assert not np.array_equal(out, symbols)
            assert encode(out, contexts, model, lanes=bad[0]) == bytes(bad)
    assert caught >= 0.95 * trials


def test_equal_frequency_swap_is_undetectable():
    """The documented limit: the low state bits of a uniform source are the symbols."""
    model = Model(np.array([[8, 8]], dtype=np.uint32), precision=4)
    stream = encode(np.array([1]), np.array([0]), model)
    bad = bytearray(stream)
    # the state is 2 L + 8 (slot 8 = symbol 1 at offset 0); clearing bit 3 gives slot 0 =
    # symbol 0 at offset 0, and the decoder still ends in L
    assert stream == bytes([1]) + (2 * STATE_LOW + 8).to_bytes(4, "little")
    bad[1] ^= 0x08
    assert decode(bytes(bad), np.array([0]), model).tolist() == [0]


@given(st.data())
def test_mutated_streams_raise_or_are_valid_encodings(data):
    """Any stream `decode` accepts is exactly the encoding of what it returned."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    alphabet = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(0, 60))
    symbols, contexts = random_source(rng, n, alphabet, 2, 0.5)
    model = build_model(symbols, contexts, alphabet, 2, precision=data.draw(st.integers(3, 12)))
    stream = bytearray(encode(symbols, contexts, model, lanes=data.draw(st.integers(1, 4))))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["set", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(stream)))
        byte = data.draw(st.integers(0, 255))
        if kind == "insert":
            stream.insert(pos, byte)
        elif pos < len(stream):
            if kind == "set":
                stream[pos] = byte
            else:
                del stream[pos]
    try:
        out = decode(bytes(stream), contexts, model)
    except ValueError:
        return
    assert out.shape == (n,) and out.dtype == np.int64
    assert np.all((out >= 0) & (out < alphabet))
    assert encode(out, contexts, model, lanes=stream[0]) == bytes(stream)


def test_wrong_count_is_detected(coded):
    symbols, contexts, model, stream = coded
    for other in (contexts[:-1], np.concatenate([contexts, contexts[:1]])):
        with pytest.raises(ValueError, match="stream"):
            decode(stream, other, model)


@pytest.mark.parametrize(
    "header, message",
    [
        (b"", "empty"),
        (b"\x00", "lanes"),
        (bytes([MAX_LANES + 1]) + bytes(4 * (MAX_LANES + 1)), "lanes"),
        (b"\x02" + STATE_LOW.to_bytes(4, "little"), "truncated"),
        (b"\x01" + (STATE_LOW - 1).to_bytes(4, "little"), "outside"),
        (b"\x01" + (1 << 31).to_bytes(4, "little"), "outside"),
    ],
)
def test_bad_headers(header, message):
    model = Model(np.array([[16]], dtype=np.uint32), precision=4)
    with pytest.raises(ValueError, match=message):
        decode(header, np.zeros(3, dtype=np.int64), model)


# --------------------------------------------------------------------------- input checks


def test_encode_rejects_bad_inputs():
    model = Model(np.array([[8, 8, 0], [0, 0, 0]], dtype=np.uint32), precision=4)
    ok = np.array([0, 1, 0])
    zeros = np.zeros(3, dtype=np.int64)
    with pytest.raises(TypeError, match="symbols"):
        encode(ok.astype(np.float64), zeros, model)
    with pytest.raises(TypeError, match="contexts"):
        encode(ok, zeros.astype(bool), model)
    with pytest.raises(TypeError, match="symbols"):
        encode("abc", zeros, model)
    with pytest.raises(ValueError, match="symbols must be 1-D"):
        encode(ok[None, :], zeros, model)
    with pytest.raises(ValueError, match=r"symbols must be >= 0, got symbols\[1\] = -1"):
        encode(np.array([0, -1, 0]), zeros, model)
    with pytest.raises(ValueError, match=r"symbols must be < model.alphabet = 3"):
        encode(np.array([0, 3, 0]), zeros, model)
    with pytest.raises(ValueError, match="symbols must be <"):
        encode(np.array([2**63], dtype=np.uint64), np.zeros(1, dtype=np.int64), model)
    with pytest.raises(ValueError, match=r"contexts must be < model.num_contexts = 2"):
        encode(ok, np.array([0, 2, 0]), model)
    with pytest.raises(ValueError, match="same length"):
        encode(ok, zeros[:2], model)
    with pytest.raises(ValueError, match=r"symbols\[2\] = 2 has frequency 0 under context 0"):
        encode(np.array([0, 1, 2, 2]), np.zeros(4, dtype=np.int64), model)
    with pytest.raises(ValueError, match=r"symbols\[1\] = 0 has frequency 0 under context 1"):
        encode(np.array([0, 0]), np.array([0, 1]), model)
    with pytest.raises(ValueError, match="frequency 0"):
        ideal_bits(np.array([2]), np.array([0]), model)
    with pytest.raises(TypeError, match="model"):
        encode(ok, zeros, model.frequencies)
    with pytest.raises(ValueError, match="lanes"):
        encode(ok, zeros, model, lanes=0)
    with pytest.raises(ValueError, match="lanes"):
        encode(ok, zeros, model, lanes=MAX_LANES + 1)


def test_decode_rejects_bad_inputs():
    model = Model(np.array([[8, 8], [0, 0]], dtype=np.uint32), precision=4)
    stream = encode(np.array([0, 1]), np.array([0, 0]), model)
    with pytest.raises(TypeError, match="data"):
        decode("not bytes", np.zeros(2, dtype=np.int64), model)
    with pytest.raises(TypeError, match="data"):
        decode(np.frombuffer(stream, dtype=np.uint8).astype(np.uint16), np.zeros(2, np.int64),
               model)
    with pytest.raises(TypeError, match="contexts"):
        decode(stream, np.zeros(2), model)
    with pytest.raises(ValueError, match="contexts must be <"):
        decode(stream, np.array([0, 2]), model)
    with pytest.raises(ValueError, match=r"contexts\[1\] = 1 has no symbol"):
        decode(stream, np.array([0, 1]), model)
    with pytest.raises(TypeError, match="model"):
        decode(stream, np.zeros(2, dtype=np.int64), None)


def test_build_model_rejects_bad_inputs():
    with pytest.raises(ValueError, match="more than 2\\*\\*precision = 4"):
        build_model(np.arange(5), np.zeros(5, dtype=np.int64), 5, 1, precision=2)
    with pytest.raises(ValueError, match="precision"):
        build_model(np.arange(5), np.zeros(5, dtype=np.int64), 5, 1, precision=17)
    with pytest.raises(TypeError, match="alphabet"):
        build_model(np.arange(5), np.zeros(5, dtype=np.int64), 5.0, 1)
    with pytest.raises(ValueError, match="alphabet"):
        build_model(np.arange(5), np.zeros(5, dtype=np.int64), 0, 1)
    with pytest.raises(ValueError, match="symbols must be < alphabet = 4"):
        build_model(np.arange(5), np.zeros(5, dtype=np.int64), 4, 1)
    with pytest.raises(ValueError, match="contexts must be < num_contexts = 1"):
        build_model(np.arange(2), np.arange(2), 4, 1)
    with pytest.raises(ValueError, match="same length"):
        build_model(np.arange(2), np.zeros(3, dtype=np.int64), 4, 1)


# --------------------------------------------------------------------------- the model


@given(sources(max_n=300))
def test_normalisation_properties(source):
    symbols, contexts, alphabet, num_contexts, precision = source
    model = build_model(symbols, contexts, alphabet, num_contexts, precision)
    total = 1 << precision
    counts = np.bincount(contexts * alphabet + symbols, minlength=num_contexts * alphabet)
    counts = counts.reshape(num_contexts, alphabet)
    freq = model.frequencies.astype(np.int64)
    assert model.frequencies.dtype == np.uint32
    assert freq.shape == (num_contexts, alphabet)
    for c in range(num_contexts):
        row_total = counts[c].sum()
        if row_total == 0:
            assert not freq[c].any()
            continue
        assert freq[c].sum() == total
        assert np.all((freq[c] >= 1) == (counts[c] >= 1))
        target = counts[c] * total / row_total
        if np.all(target >= 1):  # no symbol needed the floor of 1: within 1 of the target
            assert np.all(np.abs(freq[c] - target) < 1)


def test_normalisation_steals_from_the_most_frequent():
    counts_symbols = np.repeat(np.arange(4), [1000, 1, 1, 1])
    model = build_model(counts_symbols, np.zeros(1003, dtype=np.int64), 4, 1, precision=4)
    # floors 15, 0, 0, 0 -> 15, 1, 1, 1 (sum 18) -> take 2 from the largest
    assert model.frequencies.tolist() == [[13, 1, 1, 1]]
    # ties: largest remainders first, smaller symbol first among equals
    model = build_model(np.arange(3), np.zeros(3, dtype=np.int64), 3, 1, precision=4)
    assert model.frequencies.tolist() == [[6, 5, 5]]


@st.composite
def models(draw):
    precision = draw(st.integers(1, 16))
    alphabet = draw(st.integers(1, 300))
    num_contexts = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    freq = np.zeros((num_contexts, alphabet), dtype=np.uint32)
    for c in range(num_contexts):
        if draw(st.booleans()) and c:
            continue  # an empty context
        # a random composition of 2**precision into `alphabet` parts, zeros allowed
        cuts = np.sort(rng.integers(0, (1 << precision) + 1, size=alphabet - 1))
        freq[c] = np.diff(np.concatenate([[0], cuts, [1 << precision]]))
    return Model(freq, precision)


@given(models())
def test_model_serialisation_round_trip(model):
    data = model.to_bytes()
    assert isinstance(data, bytes)
    assert len(data) == model.nbytes
    again = Model.from_bytes(data)
    assert again == model and hash(again) == hash(model)
    assert again.to_bytes() == data
    assert Model.from_bytes(bytearray(data)) == model


def test_model_bytes_layout():
    model = Model(np.array([[0, 16384], [127, 16257]], dtype=np.uint32), precision=14)
    data = model.to_bytes()
    assert data == bytes([14, 2, 2, 0x00, 0x80, 0x80, 0x01, 0x7F, 0x81, 0x7F])
    assert model.nbytes == 10
    big = Model(np.array([[1 << 16]], dtype=np.uint32), precision=16)
    assert big.to_bytes() == bytes([16, 1, 1, 0x80, 0x80, 0x04])


def test_corrupted_model_bytes(rng):
    model = Model(np.array([[200, 56, 0], [0, 0, 0], [1, 1, 254]], dtype=np.uint32), 8)
    data = model.to_bytes()
    for length in range(len(data)):
        with pytest.raises(ValueError):
            Model.from_bytes(data[:length])
    with pytest.raises(ValueError, match="trailing"):
        Model.from_bytes(data + b"\x00")
    cases = {
        "precision": bytes([0, 1, 1, 1]),
        "precision must": bytes([17, 1, 1, 1]),
        "alphabet and num_contexts": bytes([4, 0, 1]),
        "minimal": bytes([4, 1, 1, 0x90, 0x00]),  # 16 written in two bytes
        "minimal varint": bytes([4, 0x81, 0x00, 1, 16]),  # alphabet 1 written in two bytes
        "exceeds 2\\*\\*precision": bytes([4, 1, 1, 0x11]),  # 17 > 16
        "longer than 3": bytes([4, 1, 1, 0x80, 0x80, 0x80, 0x01]),
        "sum to 15": bytes([4, 2, 1, 8, 7]),
        "alphabet = 65537 exceeds": bytes([4, 0x81, 0x80, 0x04, 1]),
        "num_contexts exceeds": bytes([4, 0xFF, 0xFF, 0x03, 0xFF, 0xFF, 0x03]),
        "truncated: 10 frequencies": bytes([4, 2, 5, 1, 1]),
        "fewer than 2 frequencies": bytes([4, 2, 1, 0x80, 0x80]),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            Model.from_bytes(bad)
    with pytest.raises(TypeError, match="bytes-like"):
        Model.from_bytes("08")
    # random byte flips: a ValueError or a model that passes every check, never anything else
    for _ in range(300):
        bad = bytearray(data)
        bad[rng.integers(len(bad))] ^= int(rng.integers(1, 256))
        try:
            other = Model.from_bytes(bytes(bad))
        except ValueError:
            continue
        assert other.to_bytes() == bytes(bad)


def test_model_is_frozen_and_validated():
    freq = np.array([[8, 8]], dtype=np.uint32)
    model = Model(freq, 4)
    freq[0, 0] = 0  # the model holds its own copy
    assert model.frequencies.tolist() == [[8, 8]]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.precision = 5
    with pytest.raises(ValueError):
        model.frequencies[0, 0] = 1  # read-only
    assert model.cumulative.tolist() == [[0, 8, 16]]
    assert model.cumulative.dtype == np.uint32
    assert Model(np.array([[8, 8]], dtype=np.int64), 4) == model
    with pytest.raises(ValueError, match="sum to 15"):
        Model(np.array([[8, 7]], dtype=np.uint32), 4)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*precision = 16\]"):
        Model(np.array([[-1, 17]]), 4)
    with pytest.raises(TypeError, match="frequencies"):
        Model(np.array([[8.0, 8.0]]), 4)
    with pytest.raises(TypeError, match="frequencies"):
        Model([[8, 8]], 4)
    with pytest.raises(ValueError, match="shape"):
        Model(np.array([8, 8], dtype=np.uint32), 4)
    with pytest.raises(ValueError, match="shape"):
        Model(np.zeros((0, 3), dtype=np.uint32), 4)
    with pytest.raises(ValueError, match="precision"):
        Model(freq, 0)
    with pytest.raises(TypeError, match="precision"):
        Model(freq, 4.0)
    assert model != Model(np.array([[4, 12]], dtype=np.uint32), 4)
    assert model != Model(np.array([[16, 16]], dtype=np.uint32), 5)


def test_ideal_bits_matches_definition(rng):
    symbols, contexts = random_source(rng, 2000, 7, 3, 0.4)
    model = build_model(symbols, contexts, 7, 3, precision=12)
    p = model.frequencies[contexts, symbols] / 4096.0
    assert ideal_bits(symbols, contexts, model) == pytest.approx(-np.log2(p).sum(), rel=1e-12)
    empty = np.zeros(0, dtype=np.int64)
    assert ideal_bits(empty, empty, model) == 0.0


def test_stream_bound_arguments():
    assert stream_bound(0, 0.0, 14) == 5
    assert stream_bound(3, 0.0, 14, lanes=8) == 1 + 4 * 3
    with pytest.raises(ValueError, match="precision"):
        stream_bound(3, 0.0, 17)
    with pytest.raises(ValueError, match="n"):
        stream_bound(-1, 0.0, 14)


def test_signed_integers_round_trip_under_one_context():
    rng = np.random.default_rng(3)
    values = np.rint(rng.laplace(0, 3, (40, 50))).astype(np.int32)
    stream, model, offset = entropy.encode_integers(values)
    assert offset == max(1, int(np.abs(values).max())) and model.alphabet == 2 * offset + 1
    np.testing.assert_array_equal(
        entropy.decode_integers(stream, model, offset, values.size).reshape(values.shape),
        values)
    # memoryless: within the coder's bound of the empirical entropy of the values
    _, counts = np.unique(values, return_counts=True)
    entropy_bits = -(counts * np.log2(counts / values.size)).sum()
    assert len(stream) * 8 < entropy_bits * 1.01 + 64
    zeros = np.zeros(7, np.int64)
    stream, model, offset = entropy.encode_integers(zeros)
    assert np.array_equal(entropy.decode_integers(stream, model, offset, 7), zeros)
    with pytest.raises(TypeError, match="integer"):
        entropy.encode_integers(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="32767"):
        entropy.encode_integers(np.array([0, 40000]))

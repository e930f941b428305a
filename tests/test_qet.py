"""QET: the substitution tree is exactly invertible, the bits are exact, the codes are nearest."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import latkv
from latkv import qet
from latkv.packing import unpack_bits


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(0, 4), rows=st.integers(1, 6), data=st.data())
def test_substitution_tree_is_exactly_invertible(layers, rows, data):
    dim = (1 << layers) * data.draw(st.integers(1, 3))
    # small integers make ties (equal neighbours) common
    x = data.draw(arrays(np.float32, (rows, dim), elements=st.integers(-3, 3).map(float)))
    reordered, indicators = qet.entangle(x, layers)
    assert indicators.shape == (layers, rows, dim // 2)
    assert np.array_equal(np.sort(reordered, axis=1), np.sort(x, axis=1))  # a permutation
    assert np.array_equal(qet.disentangle(reordered, indicators), x)


def test_one_level_puts_pair_minima_left():
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    reordered, indicators = qet.entangle(x, 1)
    assert (reordered[:, :8] <= reordered[:, 8:]).all()
    assert np.array_equal(indicators[0], x[:, 0::2] < x[:, 1::2])
    # three levels: the first column group holds minima of minima of minima, the last maxima
    # of maxima of maxima, and every column varies much less than the data (variance 1)
    deep, _ = qet.entangle(np.random.default_rng(1).standard_normal((4000, 64)), 3)
    means = deep.reshape(4000, 8, 8).mean(axis=(0, 2))
    assert means.argmin() == 0 and means.argmax() == 7
    assert deep.var(axis=0).mean() < 0.4


def test_codewords_fill_the_budget_exactly():
    qz = latkv.QET(dim=64, bits=4)
    for rows in (1, 7, 32, 128):
        left = 4 * rows * 64 - 3 * rows * 64 // 2 - (-(3 * rows * 64 // 2) % 8)
        for share, k in zip(qz.stage_share, qz.codewords(rows)):
            fits = qet.stage_bits(rows, 64, 4, k, 10) <= share * left
            assert fits or k == 1
            if k < min(rows, qet.MAX_CODEWORDS):
                assert qet.stage_bits(rows, 64, 4, k + 1, 10) > share * left


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_stored_bits_never_exceed_the_budget(bits):
    qz = latkv.QET(dim=64, bits=bits)
    x = np.random.default_rng(2).standard_normal((3, 256, 64)).astype(np.float32)
    codes = qz.encode(x)
    assert codes.nbytes == qz.encoded_nbytes(x.shape)
    assert 8 * codes.nbytes / x.size <= bits
    assert qz.bits_per_coordinate <= bits


def test_codes_are_the_nearest_quantized_codewords():
    qz = latkv.QET(dim=32, bits=4, stage_share=(1.0,), subspaces=4)
    x = np.random.default_rng(3).standard_normal((1, 128, 32)).astype(np.float32)
    codes = qz.encode(x)
    (k,) = qz.codewords(128)
    arrays = {name: a[0, 0] for name, a in codes.arrays.items()}
    levels = qet.unpack_wide(arrays, "codebook0", 10, k * 32)
    minimum, step = codes["grid0"][0, 0]
    values = qet.codebook_values(levels, minimum, step).reshape(4, k, 8).astype(np.float64)
    assigned = unpack_bits(codes["codes0_low"][0, 0], qet.code_bits(k), 128 * 4).reshape(128, 4)
    reordered, _ = qet.entangle(x[0], 3)
    for m in range(4):
        target = reordered[:, 8 * m:8 * m + 8].astype(np.float64)
        distances = ((target[:, None] - values[m][None]) ** 2).sum(axis=-1)
        chosen = distances[np.arange(128), assigned[:, m]]
        assert np.allclose(chosen, distances.min(axis=1), rtol=0, atol=1e-9)


def test_decode_matches_the_stage_reconstruction_and_the_seed_decides():
    x = np.random.default_rng(4).standard_normal((2, 160, 32)).astype(np.float32)
    qz = latkv.QET(dim=32, bits=4)
    first, second = qz.encode(x), qz.encode(x.copy())
    for name in first.arrays:
        assert np.array_equal(first[name], second[name])
    other = latkv.QET(dim=32, bits=4, seed=1).encode(x)
    assert any(not np.array_equal(first[n], other[n]) for n in first.arrays)
    # the residual stage only helps: its reconstruction error is below the first stage's
    one_stage = latkv.QET(dim=32, bits=4, stage_share=(0.7,))
    error_two = ((qz.decode(first) - x) ** 2).mean()
    error_one = ((one_stage.decode(one_stage.encode(x)) - x) ** 2).mean()
    assert error_two < error_one


def test_substitution_beats_plain_product_quantization_on_gaussian_blocks():
    """The documented comparison (docs/methods/qet.md): 128-token blocks, dim 64, 4 bits."""
    x = np.random.default_rng(0).standard_normal((8, 128, 64)).astype(np.float32)
    pq = latkv.QET(dim=64, bits=4, layers=0, stage_share=(1.0,))
    tree = latkv.QET(dim=64, bits=4)
    error_pq = float(((pq.decode(pq.encode(x)) - x) ** 2).mean())
    error_tree = float(((tree.decode(tree.encode(x)) - x) ** 2).mean())
    assert error_tree < 0.5 * error_pq


def test_corrupted_codes_are_refused():
    qz = latkv.QET(dim=32, bits=5)
    x = np.random.default_rng(5).standard_normal((1, 64, 32)).astype(np.float32)
    codes = qz.encode(x)
    assert qz.codewords(64)[0] == 12      # 4-bit codes, so 15 is out of range
    arrays = dict(codes.arrays)
    arrays["tail_codes0_low"] = np.full_like(arrays["tail_codes0_low"], 255)
    bad = latkv.Codes(codes.method, codes.params, codes.shape, codes.dtype, arrays)
    with pytest.raises(ValueError, match="codeword indices"):
        qz.decode(bad)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dim": 12}, ValueError, "2\\^layers"),
    ({"dim": 64, "bits": 0.1}, ValueError, "bits"),
    ({"dim": 64, "bits": "4"}, TypeError, "bits"),
    ({"dim": 64, "stage_share": "0.9-0.3"}, ValueError, "stage_share"),
    ({"dim": 64, "stage_share": "a-b"}, ValueError, "stage_share must look like '0.7-0.3'"),
    ({"dim": 64, "stage_share": {"a": 1}}, TypeError, "stage_share must be a sequence"),
    ({"dim": 64, "codebook_bits": 17}, ValueError, "codebook_bits"),
    ({"dim": 64, "layers": 7}, ValueError, "layers"),
])
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        latkv.QET(**kwargs)


def test_needs_a_token_axis():
    with pytest.raises(ValueError, match="2 axes"):
        latkv.QET(dim=16, bits=4).encode(np.zeros(16, np.float32))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 16), count=st.integers(0, 50), data=st.data())
def test_wide_packing_round_trips(bits, count, data):
    values = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count,
                                         max_size=count)), dtype=np.uint16)
    arrays = qet.pack_wide("x", values, bits)
    assert set(arrays) == set(qet.wide_layout("x", (), count, bits))
    assert sum(a.nbytes for a in arrays.values()) == qet.wide_bytes(count, bits)
    assert np.array_equal(qet.unpack_wide(arrays, "x", bits, count), values)


@pytest.mark.parametrize("n, k, d", [(50, 7, 3), (3000, 40, 16), (70000, 3, 1)])
def test_numba_kmeans_kernels_are_bit_exact(n, k, d):
    from latkv._cpu import kmeans as fast

    rng = np.random.default_rng(n)
    for points in (rng.standard_normal((n, d)),
                   rng.integers(-2, 3, (n, d)).astype(np.float64)):   # many exact ties
        codewords = points[rng.choice(n, k, replace=False)] + 0.0
        codewords[-1] = codewords[0]                                   # a duplicate codeword
        labels = qet.nearest_codeword_reference(points, codewords)
        assert np.array_equal(fast.nearest_codeword(points, codewords), labels)
        sums, counts = qet.cluster_sums_reference(points, labels, k)
        fast_sums, fast_counts = fast.cluster_sums(points, labels, k)
        assert np.array_equal(fast_sums, sums) and np.array_equal(fast_counts, counts)


def test_large_blocks_use_wide_codes():
    qz = latkv.QET(dim=8, bits=6, layers=0, block=1024, subspaces=1, codebook_bits=8)
    (k0, k1) = qz.codewords(1024)
    assert k0 > 256 and qet.code_bits(k0) == 9          # codes of 9 bits: a low and high part
    x = np.random.default_rng(6).standard_normal((1, 1024, 8)).astype(np.float32)
    codes = qz.encode(x)
    assert 8 * codes.nbytes / x.size <= 6
    assert np.array_equal(qz.decode(codes), qz.decode(qz.encode(x, backend="numpy")))

"""numba codebook and sign-sketch kernels against their NumPy references.

Codes are compared byte for byte (boundary values, their float32 neighbours, signed zeros,
values beyond the outer boundaries, infinities, NaN, zero and negative norms), dequantized
values exactly, scores to float32 rounding: ``|fast - reference| <= 1e-5 * sum_j |q_j c_j|``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from latkv._cpu import codebook as kernels
from latkv._cpu import serial
from latkv._cpu import sign_sketch
from latkv._cpu.codebook import codebook_dequantize, codebook_quantize, codebook_scores
from latkv._cpu.sign_sketch import sign_scores
from latkv.codebooks import sphere_codebook
from latkv.packing import pack_bits_reference, packed_length
from latkv.qjl import sign_scores_reference
from latkv.turbo import (codebook_dequantize_reference, codebook_quantize_reference,
                         codebook_scores_reference)

KINDS = ("sphere", "hand", "clustered", "short")


def make_codebook(kind: str, dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(boundaries, centroids) float32 of one of the test codebooks.

    ``sphere``: `sphere_codebook`. ``hand``: ``2**bits - 1`` dyadic cubes (0 among them),
    centroids between them. ``clustered``: all but two boundaries within 1e-3 of 0 and two at
    +-100 (long walks in the grid search of large codebooks). ``short``: fewer than
    ``2**bits - 1`` boundaries, one of them repeated.
    """
    levels = 1 << bits
    if kind == "sphere":
        book = sphere_codebook(max(dim, 2), bits)
        return book.boundaries, book.centroids
    if kind == "hand":
        steps = np.arange(levels - 1) - (levels - 2) / 2
        boundaries = (steps / 2.0 ** (bits - 1)) ** 3
    elif kind == "clustered":
        inner = np.linspace(-1e-3, 1e-3, max(levels - 3, 0))
        boundaries = np.sort(np.concatenate([[-100.0], inner, [100.0]]))[:levels - 1]
    else:
        count = max(1, (levels - 1) // 2)
        base = np.linspace(-0.5, 0.5, max(count - 1, 1))
        boundaries = np.sort(np.concatenate([base, base[:1]]))[:count]
    boundaries = boundaries.astype(np.float32)
    centroids = np.concatenate([[boundaries[0] - 0.5], (boundaries[:-1] + boundaries[1:]) / 2,
                                [boundaries[-1] + 0.5]]).astype(np.float32)
    centroids = np.resize(centroids, levels)  # "short": pad to 2**bits entries
    return boundaries, centroids


def special_values(boundaries: np.ndarray) -> np.ndarray:
    """Values where the code changes, their float32 neighbours and the extremes."""
    edges = np.concatenate([boundaries, [0.0, -0.0]]).astype(np.float32)
    extremes = np.array([0.0, -0.0, 2.0, -2.0, 1e30, -1e30, np.inf, -np.inf, np.nan,
                         boundaries[0] - 1, boundaries[-1] + 1], np.float32)
    return np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)),
                           np.nextafter(edges, np.float32(-np.inf)), extremes])


def quantize_inputs(rng: np.random.Generator, rows: int, dim: int,
                    boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a random unit-scale direction times a norm, and rows of special values with
    norm 1 (so that ``u`` is exactly the value), 0, -1 or NaN (both divide by 1)."""
    rotated = rng.standard_normal((rows, dim)).astype(np.float32)
    norm = np.linalg.norm(rotated, axis=1).astype(np.float32)
    special = rng.random(rows) < 0.5
    pool = special_values(boundaries)
    rotated[special] = rng.choice(pool, size=(int(special.sum()), dim))
    norm[special] = rng.choice(np.array([1.0, 1.0, 0.0, -1.0, np.nan], np.float32),
                               size=int(special.sum()))
    return rotated, norm


def assert_close_scores(fast: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> None:
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert (np.abs(fast - reference) <= 1e-5 * bound + 1e-30).all()


def check_quantize(rng, rows, dim, bits, kind):
    boundaries, _ = make_codebook(kind, dim, bits)
    rotated, norm = quantize_inputs(rng, rows, dim, boundaries)
    with np.errstate(all="ignore"):
        expected = codebook_quantize_reference(rotated, norm, boundaries, bits)
    packed = codebook_quantize(rotated, norm, boundaries, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, packed_length(dim, bits))
    assert packed.tobytes() == expected.tobytes()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [2, 3, 31, 64, 96, 128])
def test_quantize_is_byte_identical(bits, dim):
    rng = np.random.default_rng(100 * bits + dim)
    for kind in KINDS:
        check_quantize(rng, 9, dim, bits, kind)


def test_quantize_edge_cases_by_hand():
    boundaries = np.array([-0.5, 0.0, 0.5], np.float32)
    rotated = np.array([[-0.5, 0.0, -0.0, 0.5, 0.25, -1.0, 7.0, np.nan],
                        [np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 0.5, -0.5]], np.float32)
    for norm in ([1.0, 0.0], [1.0, -2.0], [1.0, 2.0]):
        norm = np.array(norm, np.float32)
        expected = codebook_quantize_reference(rotated, norm, boundaries, 2)
        assert codebook_quantize(rotated, norm, boundaries, 2).tobytes() == expected.tobytes()
    # boundary values count as below: codes [0, 1, 1, 2, 2, 0, 3, 3] for the first row
    codes = np.array([0, 1, 1, 2, 2, 0, 3, 3])
    packed = codebook_quantize(rotated[:1], np.ones(1, np.float32), boundaries, 2)
    assert packed.tolist() == [[int((codes[:4] << [0, 2, 4, 6]).sum()),
                                int((codes[4:] << [0, 2, 4, 6]).sum())]]


def test_quantize_divides_instead_of_multiplying():
    # x / s and x * (1 / s) differ for some float32 values; put boundaries exactly on those
    # quotients: the codes must follow the division
    rng = np.random.default_rng(7)
    rotated = rng.uniform(-1, 1, (64, 64)).astype(np.float32)
    norm = rng.uniform(0.5, 3, 64).astype(np.float32)
    quotient = rotated / norm[:, None]
    product = rotated * (np.float32(1) / norm)[:, None]
    differ = quotient != product
    for bits in (6, 8):  # the linear count and the grid search
        boundaries = np.unique(quotient[differ])[:(1 << bits) - 1]
        by_product = np.searchsorted(boundaries, product).astype(np.uint8)
        expected = codebook_quantize_reference(rotated, norm, boundaries, bits)
        assert pack_bits_reference(by_product, bits).tobytes() != expected.tobytes()
        assert codebook_quantize(rotated, norm, boundaries, bits).tobytes() == expected.tobytes()


def test_quantize_norm_dtype_follows_the_reference():
    # a float64 norm is tested before the cast: 1e-50 > 0 becomes a float32 zero divisor
    rotated = np.array([[1.0, -1.0, 0.0, 0.5]], np.float32)
    boundaries, _ = make_codebook("hand", 4, 2)
    for value in (1e-50, 0.0, 2.0):
        norm = np.array([value])
        with np.errstate(all="ignore"):
            expected = codebook_quantize_reference(rotated, norm, boundaries, 2)
        assert codebook_quantize(rotated, norm, boundaries, 2).tobytes() == expected.tobytes()


@given(bits=st.integers(1, 8), dim=st.integers(1, 40), rows=st.integers(0, 6),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_quantize_property(bits, dim, rows, kind, seed):
    check_quantize(np.random.default_rng(seed), rows, dim, bits, kind)


def random_packed(rng, lead, dim, bits):
    """Arbitrary bytes, padding bits included (they must be ignored)."""
    return rng.integers(0, 256, (*lead, packed_length(dim, bits)), dtype=np.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [2, 3, 31, 64, 96, 128])
def test_dequantize_is_exact(bits, dim):
    rng = np.random.default_rng(bits * dim)
    for kind in ("sphere", "hand"):
        _, centroids = make_codebook(kind, dim, bits)
        packed = random_packed(rng, (7,), dim, bits)
        values = codebook_dequantize(packed, centroids, bits, dim)
        expected = codebook_dequantize_reference(packed, centroids, bits, dim)
        assert values.dtype == np.float32 and values.tobytes() == expected.tobytes()


def test_quantize_then_dequantize_round_trip():
    rng = np.random.default_rng(3)
    boundaries, centroids = make_codebook("sphere", 64, 3)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    norm = np.linalg.norm(x, axis=1).astype(np.float32)
    u_hat = codebook_dequantize(codebook_quantize(x, norm, boundaries, 3), centroids, 3, 64)
    u = x / norm[:, None]
    nearest = centroids[np.abs(u[..., None] - centroids).argmin(-1)]
    assert np.array_equal(u_hat, nearest)


def check_scores(rng, batches, m, n, dim, bits, kind):
    _, centroids = make_codebook(kind, dim, bits)
    q = rng.standard_normal((batches, m, dim)).astype(np.float32)
    packed = random_packed(rng, (batches, n), dim, bits)
    scores = codebook_scores(q, packed, centroids, bits, dim)
    expected = codebook_scores_reference(q, packed, centroids, bits, dim)
    values = codebook_dequantize_reference(packed.reshape(-1, packed.shape[-1]), centroids, bits,
                                           dim).reshape(batches, n, dim)
    bound = np.abs(q).astype(np.float64) @ np.abs(values).astype(np.float64).swapaxes(-1, -2)
    assert_close_scores(scores, expected, bound)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [2, 3, 31, 64, 96, 128])
def test_scores_are_close(bits, dim):
    check_scores(np.random.default_rng(bits + dim), 2, 3, 21, dim, bits, "sphere")


@given(bits=st.integers(1, 8), dim=st.integers(1, 40), batches=st.integers(1, 3),
       m=st.integers(0, 4), n=st.integers(0, 70), kind=st.sampled_from(("sphere", "hand")),
       seed=st.integers(0, 2**32 - 1))
def test_scores_property(bits, dim, batches, m, n, kind, seed):
    check_scores(np.random.default_rng(seed), batches, m, n, dim, bits, kind)


def check_sign_scores(rng, batches, m, n, rows):
    q = rng.standard_normal((batches, m, rows)).astype(np.float32)
    packed = random_packed(rng, (batches, n), rows, 1)
    scores = sign_scores(q, packed, rows)
    expected = sign_scores_reference(q, packed, rows)
    bound = np.broadcast_to(np.abs(q).astype(np.float64).sum(-1)[..., None], expected.shape)
    assert_close_scores(scores, expected, bound)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 37, 64, 128, 256])
def test_sign_scores_are_close(rows):
    check_sign_scores(np.random.default_rng(rows), 2, 3, 70, rows)


def test_sign_scores_by_hand():
    q = np.array([[[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]]], np.float32)
    packed = np.array([[[0b00000101, 0b11111111], [0, 0], [255, 1]]], np.uint8)  # padding set
    total = 511.0
    expected = [2 * (1 + 4 + 256) - total, -total, total]
    assert sign_scores(q, packed, 9).tolist() == [[expected]]


@given(rows=st.integers(1, 300), batches=st.integers(1, 3), m=st.integers(0, 4),
       n=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_sign_scores_property(rows, batches, m, n, seed):
    check_sign_scores(np.random.default_rng(seed), batches, m, n, rows)


def test_parallel_kernels_on_inputs_above_the_serial_threshold():
    rng = np.random.default_rng(11)
    rows = serial.SERIAL_BELOW // 64 + 3
    for bits, kind in ((3, "sphere"), (8, "sphere"), (8, "clustered")):
        check_quantize(rng, rows, 64, bits, kind)
    _, centroids = make_codebook("sphere", 64, 4)
    packed = random_packed(rng, (rows,), 64, 4)
    assert codebook_dequantize(packed, centroids, 4, 64).tobytes() == \
        codebook_dequantize_reference(packed, centroids, 4, 64).tobytes()
    check_scores(rng, 2, 5, 150, 64, 4, "sphere")
    check_sign_scores(rng, 2, 5, 150, 64)


def test_small_inputs_use_serial_clones_with_their_own_cache_entries():
    for kernel in (kernels._quantize_rows, kernels._dequantize_rows, kernels._codebook_scores,
                   sign_sketch._sign_scores):
        clone = serial.kernel_for(kernel, 1)
        assert serial.kernel_for(kernel, serial.SERIAL_BELOW) is kernel
        assert kernel.targetoptions.get("parallel") and not clone.targetoptions.get("parallel")
        assert clone.py_func.__qualname__ != kernel.py_func.__qualname__


def test_dequantize_keeps_leading_axes_and_empty_inputs():
    _, centroids = make_codebook("hand", 5, 3)
    packed = random_packed(np.random.default_rng(0), (2, 3), 5, 3)
    assert codebook_dequantize(packed, centroids, 3, 5).shape == (2, 3, 5)
    assert codebook_dequantize(packed[:0], centroids, 3, 5).shape == (0, 3, 5)
    boundaries, _ = make_codebook("hand", 5, 3)
    empty = codebook_quantize(np.zeros((0, 5), np.float32), np.zeros(0, np.float32), boundaries, 3)
    assert empty.shape == (0, 2)
    assert codebook_scores(np.zeros((2, 0, 5), np.float32), packed, centroids, 3, 5).shape == \
        (2, 0, 3)
    assert sign_scores(np.zeros((1, 2, 9), np.float32), np.zeros((1, 0, 2), np.uint8),
                       9).shape == (1, 2, 0)


def test_bad_arguments_are_refused():
    boundaries, centroids = make_codebook("hand", 4, 2)
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="norm must have shape"):
        codebook_quantize(x, np.ones(2, np.float32), boundaries, 2)
    with pytest.raises(ValueError, match="at most 2\\*\\*bits - 1"):
        codebook_quantize(x, np.ones(3, np.float32), boundaries, 1)
    with pytest.raises(ValueError, match="bits"):
        codebook_quantize(x, np.ones(3, np.float32), boundaries, 9)
    with pytest.raises(ValueError, match="last dimension"):
        codebook_dequantize(np.zeros((3, 2), np.uint8), centroids, 2, 4)
    with pytest.raises(ValueError, match="at least 2\\*\\*bits"):
        codebook_dequantize(np.zeros((3, 1), np.uint8), centroids[:3], 2, 4)
    with pytest.raises(ValueError, match="same B"):
        codebook_scores(np.zeros((2, 1, 4), np.float32), np.zeros((1, 3, 1), np.uint8),
                        centroids, 2, 4)
    with pytest.raises(ValueError, match="ceil\\(rows/8\\)"):
        sign_scores(np.zeros((1, 1, 9), np.float32), np.zeros((1, 3, 1), np.uint8), 9)

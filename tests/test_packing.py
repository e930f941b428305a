"""Bit packing: the layout, round trips, and every backend byte-identical to the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import latkv
from latkv._backend import numba_cuda_available
from latkv.packing import pack_bits_reference, packed_length, unpack_bits_reference

CPU_BACKENDS = ("numpy", "numba")
needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)
ALL_BACKENDS = (*CPU_BACKENDS, pytest.param("numba.cuda", marks=needs_numba_cuda))


@st.composite
def codes_and_bits(draw, max_lead=3, max_rows=3, max_n=40):
    """A bit width and uint8 codes below ``2**bits`` of shape (*lead, n), lead dims possibly 0."""
    bits = draw(st.integers(1, 8))
    lead = tuple(draw(st.lists(st.integers(0, max_rows), max_size=max_lead)))
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(*lead, n), dtype=np.uint8)
    return codes, bits


@st.composite
def packed_bytes(draw, max_rows=3, max_n=40):
    """Arbitrary packed rows (padding bits included) for a bit width and a code count."""
    bits = draw(st.integers(1, 8))
    n = draw(st.integers(0, max_n))
    rows = draw(st.integers(0, max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    packed = np.random.default_rng(seed).integers(
        0, 256, size=(rows, packed_length(n, bits)), dtype=np.uint8
    )
    return packed, bits, n


# ---------------------------------------------------------------- documented examples


EXAMPLES = [
    # (bits, codes, packed bytes), derived by hand from the layout: code i at bits i*b..i*b+b-1
    (1, [1, 0, 0, 0, 0, 0, 0, 0], [0x01]),
    (1, [0, 0, 0, 0, 0, 0, 0, 1, 1], [0x80, 0x01]),
    (4, [3, 10], [0xA3]),
    (3, [1, 2, 3], [0xD1, 0x00]),  # 0b11_010_001; the high bit of code 2 (a 0) spills over
    (2, [0, 1, 2, 3], [0b11100100]),
    (8, [0, 7, 200, 255], [0, 7, 200, 255]),
    (5, [31], [0x1F]),
    (7, [1, 1], [0x81, 0x00]),  # code 1 starts at bit 7
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("bits", "codes", "expected"), EXAMPLES)
def test_documented_examples(backend, bits, codes, expected):
    codes = np.array(codes, dtype=np.uint8)
    packed = latkv.pack_bits(codes, bits, backend=backend)
    assert packed.dtype == np.uint8
    assert packed.tolist() == expected
    back = latkv.unpack_bits(np.array(expected, dtype=np.uint8), bits, len(codes), backend=backend)
    assert back.dtype == np.uint8
    assert back.tolist() == codes.tolist()


def test_bits_8_is_the_identity(rng):
    codes = rng.integers(0, 256, size=(3, 5, 17), dtype=np.uint8)
    np.testing.assert_array_equal(latkv.pack_bits(codes, 8), codes)
    np.testing.assert_array_equal(latkv.unpack_bits(codes, 8, 17), codes)


def test_docstring_example():
    assert latkv.pack_bits(np.array([3, 10], dtype=np.uint8), 4).tolist() == [163]
    assert latkv.unpack_bits(np.array([163], dtype=np.uint8), 4, 2).tolist() == [3, 10]


# ---------------------------------------------------------------- properties


@given(codes_and_bits())
def test_round_trip(case):
    codes, bits = case
    packed = latkv.pack_bits(codes, bits)
    assert packed.shape == (*codes.shape[:-1], packed_length(codes.shape[-1], bits))
    np.testing.assert_array_equal(latkv.unpack_bits(packed, bits, codes.shape[-1]), codes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=codes_and_bits())
def test_cpu_backends_match_reference(backend, case):
    codes, bits = case
    n = codes.shape[-1]
    expected = pack_bits_reference(codes, bits)
    packed = latkv.pack_bits(codes, bits, backend=backend)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(latkv.unpack_bits(packed, bits, n, backend=backend), codes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=packed_bytes())
def test_cpu_unpack_of_any_bytes_matches_reference(backend, case):
    # padding bits of the last byte may be set: they are ignored, as by the reference
    packed, bits, n = case
    expected = unpack_bits_reference(packed, bits, n)
    np.testing.assert_array_equal(latkv.unpack_bits(packed, bits, n, backend=backend), expected)


@pytest.mark.parametrize("bits", range(1, 9))
def test_numba_every_length_and_bits(bits, rng):
    # every tail length and both kernel paths (n % 8 == 0 reads whole words), exhaustively
    for n in [*range(0, 34), 64, 127, 128, 129]:
        codes = rng.integers(0, 1 << bits, size=(5, n), dtype=np.uint8)
        packed = latkv.pack_bits(codes, bits, backend="numba")
        np.testing.assert_array_equal(packed, pack_bits_reference(codes, bits))
        garbage = rng.integers(0, 256, size=packed.shape, dtype=np.uint8)
        np.testing.assert_array_equal(
            latkv.unpack_bits(garbage, bits, n, backend="numba"),
            unpack_bits_reference(garbage, bits, n),
        )


@needs_numba_cuda
@settings(max_examples=10)
@given(case=codes_and_bits(max_lead=2, max_rows=2, max_n=20))
def test_numba_cuda_matches_reference(case):
    # the simulator runs every thread in Python: tiny inputs only
    codes, bits = case
    n = codes.shape[-1]
    packed = latkv.pack_bits(codes, bits, backend="numba.cuda")
    assert isinstance(packed, np.ndarray)
    np.testing.assert_array_equal(packed, pack_bits_reference(codes, bits))
    np.testing.assert_array_equal(latkv.unpack_bits(packed, bits, n, backend="numba.cuda"), codes)


@needs_numba_cuda
@settings(max_examples=10)
@given(case=packed_bytes(max_rows=2, max_n=20))
def test_numba_cuda_unpack_of_any_bytes_matches_reference(case):
    packed, bits, n = case
    expected = unpack_bits_reference(packed, bits, n)
    np.testing.assert_array_equal(latkv.unpack_bits(packed, bits, n, backend="numba.cuda"), expected)


# ---------------------------------------------------------------- layouts and dtypes


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_input_gives_the_same_bytes(backend, rng):
    base = rng.integers(0, 8, size=(12, 6), dtype=np.uint8)
    for codes in (base.T, base[:, ::2], base[1::3, 1:], np.asfortranarray(base)):
        assert not codes.flags.c_contiguous
        expected = pack_bits_reference(np.ascontiguousarray(codes), 3)
        packed = latkv.pack_bits(codes, 3, backend=backend)
        np.testing.assert_array_equal(packed, expected)
        np.testing.assert_array_equal(
            latkv.unpack_bits(np.asfortranarray(packed), 3, codes.shape[-1], backend=backend),
            codes,
        )


def test_misaligned_contiguous_input(rng):
    # a C-contiguous array that does not start on an 8-byte boundary (no uint64 view)
    buffer = rng.integers(0, 4, size=8 * 16 + 1, dtype=np.uint8)
    codes = buffer[1:].reshape(8, 16)
    assert codes.flags.c_contiguous and codes.ctypes.data % 8
    packed = latkv.pack_bits(codes, 2)
    np.testing.assert_array_equal(packed, pack_bits_reference(codes, 2))
    np.testing.assert_array_equal(latkv.unpack_bits(packed, 2, 16), codes)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int8, np.int64])
def test_wider_integer_codes_are_accepted(dtype, rng):
    codes = rng.integers(0, 32, size=(4, 13)).astype(dtype)
    np.testing.assert_array_equal(
        latkv.pack_bits(codes, 5), pack_bits_reference(codes.astype(np.uint8), 5)
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 7), (2, 3, 0)])
def test_empty_inputs(backend, shape):
    codes = np.zeros(shape, dtype=np.uint8)
    packed = latkv.pack_bits(codes, 3, backend=backend)
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], 3))
    assert packed.dtype == np.uint8
    back = latkv.unpack_bits(packed, 3, shape[-1], backend=backend)
    assert back.shape == shape and back.dtype == np.uint8


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("bits", "error"), [(0, ValueError), (9, ValueError), (-1, ValueError), (2.5, TypeError)]
)
def test_bad_bits(bits, error):
    with pytest.raises(error, match="bits"):
        latkv.pack_bits(np.zeros(4, dtype=np.uint8), bits)
    with pytest.raises(error, match="bits"):
        latkv.unpack_bits(np.zeros(4, dtype=np.uint8), bits, 4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_out_of_range(bits):
    codes = np.array([0, 1 << bits], dtype=np.uint16)
    with pytest.raises(ValueError, match="codes"):
        latkv.pack_bits(codes, bits)


def test_negative_codes():
    with pytest.raises(ValueError, match="codes"):
        latkv.pack_bits(np.array([1, -1, 0], dtype=np.int64), 2)


def test_float_codes():
    with pytest.raises(TypeError, match="codes"):
        latkv.pack_bits(np.array([0.0, 1.0]), 1)


def test_codes_not_an_array():
    with pytest.raises(TypeError, match="codes"):
        latkv.pack_bits("0101", 1)


@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.float32])
def test_packed_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="packed"):
        latkv.unpack_bits(np.zeros(3, dtype=dtype), 3, 8)


@pytest.mark.parametrize(("bits", "n", "length"), [(3, 8, 2), (3, 8, 4), (1, 9, 1), (4, 0, 1)])
def test_packed_wrong_last_dimension(bits, n, length):
    with pytest.raises(ValueError, match="packed"):
        latkv.unpack_bits(np.zeros((2, length), dtype=np.uint8), bits, n)


def test_bad_n():
    with pytest.raises(ValueError, match="n must"):
        latkv.unpack_bits(np.zeros(1, dtype=np.uint8), 1, -1)
    with pytest.raises(TypeError, match="n must"):
        latkv.unpack_bits(np.zeros(1, dtype=np.uint8), 1, 8.0)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        latkv.pack_bits(np.zeros(4, dtype=np.uint8), 1, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        latkv.unpack_bits(np.zeros(1, dtype=np.uint8), 1, 4, backend="cuda")


def test_cupy_backend_on_numpy_input():
    with pytest.raises(ValueError, match="backend"):
        latkv.pack_bits(np.zeros(4, dtype=np.uint8), 1, backend="cupy")
    with pytest.raises(ValueError, match="backend"):
        latkv.unpack_bits(np.zeros(1, dtype=np.uint8), 1, 4, backend="cupy")


# ---------------------------------------------------------------- CUDA source


def test_cuda_source_compiles_with_nvrtc():
    pytest.importorskip("cuda.bindings.nvrtc")
    from latkv._gpu.nvrtc import compile_cubin

    assert len(compile_cubin("pack_bits.cu", "sm_80")) > 0


# ---------------------------------------------------------------- GPU (skipped without one)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", range(1, 9))
def test_cupy_matches_reference(bits, rng):
    import cupy

    shapes = [(1_000_000, 128), (3, 5, 77), (1000, 1), (4097, 13), (0, 8), (2, 0)]
    for shape in shapes:
        codes = rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)
        n = shape[-1]
        packed = latkv.pack_bits(cupy.asarray(codes), bits)
        assert isinstance(packed, cupy.ndarray)
        expected = pack_bits_reference(codes, bits)
        np.testing.assert_array_equal(cupy.asnumpy(packed), expected)
        # reference bytes back to codes: the reference unpack of valid bytes is the inverse
        back = latkv.unpack_bits(cupy.asarray(expected), bits, n)
        np.testing.assert_array_equal(cupy.asnumpy(back), codes)
        if expected.size <= 1 << 20:  # padding bits set too
            garbage = rng.integers(0, 256, size=expected.shape, dtype=np.uint8)
            np.testing.assert_array_equal(
                cupy.asnumpy(latkv.unpack_bits(cupy.asarray(garbage), bits, n)),
                unpack_bits_reference(garbage, bits, n),
            )
    # non-contiguous device input
    base = rng.integers(0, 1 << bits, size=(64, 40), dtype=np.uint8)
    strided = cupy.asarray(base)[:, 1::2].T
    np.testing.assert_array_equal(
        cupy.asnumpy(latkv.pack_bits(strided, bits)),
        pack_bits_reference(np.ascontiguousarray(base[:, 1::2].T), bits),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("bits", range(1, 9))
def test_numba_cuda_on_cupy_input(bits, rng):
    import cupy

    for shape in [(100_000, 128), (3, 5, 77), (0, 8)]:
        codes = rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)
        expected = pack_bits_reference(codes, bits)
        packed = latkv.pack_bits(cupy.asarray(codes), bits, backend="numba.cuda")
        assert isinstance(packed, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(packed), expected)
        back = latkv.unpack_bits(packed, bits, shape[-1], backend="numba.cuda")
        assert isinstance(back, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(back), codes)

"""The shared graph pieces against the library: packing, float16 rounding, counts, norms."""

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import latkv  # noqa: E402
from latkv.onnx.graph import (Graph, count_below, float16_from_float64, pack_bits,  # noqa: E402
                              unpack_bits, vector_norms)
from latkv.onnx.rotation import rotate  # noqa: E402


def run(g, feeds):
    session = ort.InferenceSession(g.model(18).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 13, 24, 64])
def test_pack_and_unpack_equal_the_library(bits, n):
    g = Graph("pack")
    codes = g.input("codes", "uint8", ["rows", n])
    packed = pack_bits(g, codes, bits, n)
    g.output(packed, "packed", "uint8", None)
    g.output(unpack_bits(g, packed, bits, n), "unpacked", "int64", None)
    values = np.random.default_rng(bits * n).integers(0, 1 << bits, (9, n)).astype(np.uint8)
    got_packed, got_codes = run(g, {"codes": values})
    np.testing.assert_array_equal(got_packed, latkv.pack_bits(values, bits))
    np.testing.assert_array_equal(got_codes, values)


def test_float16_rounding_is_numpys_single_rounding():
    """Every float16, every midpoint between neighbours and the doubles beside it: onnxruntime's
    own Cast (through float32) gets thousands of these wrong; the piece gets none."""
    g = Graph("round")
    g.output(float16_from_float64(g, g.input("v", "float64", ["n"])), "h", "float16", ["n"])
    finite = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(finite[np.isfinite(finite)].astype(np.float64))
    middle = finite[:-1] + np.diff(finite) / 2
    values = np.concatenate([finite, middle, np.nextafter(middle, np.inf),
                             np.nextafter(middle, -np.inf), [65519.99, 65520.0, 1e300, -0.0]])
    (got,) = run(g, {"v": values})
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))
    with np.errstate(over="ignore"):
        assert (values.astype(np.float32).astype(np.float16) != expected).sum() > 1000


@pytest.mark.parametrize("bits", range(1, 9))
def test_count_below_is_searchsorted_left(bits):
    rng = np.random.default_rng(bits)
    boundaries = np.sort(rng.standard_normal((1 << bits) - 1)).astype(np.float32)
    g = Graph("count")
    g.output(count_below(g, g.input("u", "float32", ["rows", 9]), boundaries), "codes",
             "uint8", None)
    values = rng.standard_normal((300, 9)).astype(np.float32) * 1.5
    values.flat[: boundaries.size] = boundaries                    # on a boundary: not above
    values.flat[boundaries.size: 2 * boundaries.size] = np.nextafter(boundaries, np.inf)
    (codes,) = run(g, {"u": values})
    np.testing.assert_array_equal(codes, np.searchsorted(boundaries, values, side="left"))


def test_norms_sum_in_float64():
    g = Graph("norm")
    g.output(vector_norms(g, g.input("u", "float32", ["rows", 7])), "norm", "float64", None)
    values = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    (norm,) = run(g, {"u": values})
    np.testing.assert_allclose(norm, np.linalg.norm(values.astype(np.float64), axis=1),
                               rtol=1e-15)


@pytest.mark.parametrize("dim", [2, 64, 80, 128])
@pytest.mark.parametrize("inverse", [False, True])
def test_randomized_hadamard_is_bit_exact(dim, inverse):
    rotation = latkv.RandomizedHadamard(dim, seed=5)
    g = Graph("rotate")
    g.output(rotate(g, rotation, g.input("x", "float32", ["a", "b", dim]), inverse), "y",
             "float32", None)
    x = np.random.default_rng(dim).standard_normal((3, 17, dim)).astype(np.float32)
    (y,) = run(g, {"x": x})
    np.testing.assert_array_equal(y, rotation.inverse(x) if inverse else rotation.apply(x))

"""latkv.onnx standard graphs of E8Quant at fixed rate: encode bit-identical to the library
(the lattice search, the scale ladder, the float16 rounding, the labels), decode and scores
within float32 rounding, dynamic leading axes, and the refused rANS and statistics forms."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import latkv
import latkv.onnx
from latkv.lattice import nearest_e8
from latkv.onnx import e8 as e8_graph
from latkv.onnx.graph import Graph

EPS32 = float(np.finfo(np.float32).eps)


@cache
def quantizer(dim: int, bits: int, rotation: str = "hadamard") -> latkv.E8Quant:
    return latkv.E8Quant(dim=dim, bits=bits, rotation=rotation, seed=3)


@cache
def session(dim: int, bits: int, what: str, dtype: str = "float32",
            rotation: str = "hadamard", leading: tuple[str, ...] = ("batch", "heads", "tokens")):
    model = latkv.onnx.export(quantizer(dim, bits, rotation), what, dtype=dtype,
                              leading=leading)
    return latkv.onnx.session(model)


def run(sess, **feeds) -> dict[str, np.ndarray]:
    names = [output.name for output in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def vectors(dim: int, count: int, seed: int) -> np.ndarray:
    """``(count, dim)`` float32 rows: Gaussian and heavy-tailed ones, and the adversarial
    kinds: zeros, constants, one-hot, half-integers and dyadic values (ties at .5 once
    scaled), huge, tiny and subnormal norms, norms spread over ten decades."""
    rng = np.random.default_rng(seed)
    kinds = [
        rng.standard_normal((8, dim)),
        rng.standard_t(2, (8, dim)),
        np.zeros((2, dim)),
        np.ones((3, dim)) * np.array([[1.0], [-0.5], [3.0]]),
        np.eye(dim)[rng.integers(0, dim, 3)] * np.array([[1.0], [-2.5], [7.0]]),
        rng.integers(-8, 9, (8, dim)) / 2,
        rng.integers(-64, 65, (6, dim)) / 16,
        rng.standard_normal((2, dim)) * 1e3,
        rng.standard_normal((2, dim)) * 1e-30,
        rng.standard_normal((2, dim)) * 1e-42,
        rng.standard_normal((6, dim)) * 10.0 ** rng.integers(-6, 4, (6, 1)),
    ]
    rows = np.concatenate(kinds).astype(np.float32)
    rows = rows[rng.permutation(rows.shape[0])]
    return np.resize(rows, (count, dim))


def check_encode(dim: int, bits: int, x: np.ndarray, dtype: str = "float32",
                 rotation: str = "hadamard") -> None:
    qz = quantizer(dim, bits, rotation)
    leading = tuple(f"axis{i}" for i in range(x.ndim - 1))
    out = run(session(dim, bits, "encode", dtype, rotation, leading), x=x)
    expected = qz.encode(x)
    assert sorted(out) == sorted(expected.arrays)
    for key, value in expected.arrays.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        assert np.array_equal(out[key], value), f"{key} differs at bits={bits} dim={dim}"


# -- encode: bit-identical ----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 128, 96])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_encode_is_bit_identical(bits, dim):
    x = vectors(dim, 2 * 3 * 9, seed=bits * 1000 + dim).reshape(2, 3, 9, dim)
    check_encode(dim, bits, x)


@pytest.mark.parametrize("bits", [3, 5])
def test_encode_rank_two_input(bits):
    check_encode(64, bits, vectors(64, 40, seed=bits))


@pytest.mark.parametrize("dim,bits", [(64, 2), (128, 4)])
def test_encode_float16_input(dim, bits):
    x = vectors(dim, 2 * 3 * 7, seed=dim + bits).reshape(2, 3, 7, dim).astype(np.float16)
    check_encode(dim, bits, x, dtype="float16")


@pytest.mark.parametrize("bits", [2, 8])
def test_encode_without_rotation_hits_ties_and_the_last_rung(bits):
    """Unrotated half-integers land on rounding ties; constant vectors need the ladder's top
    rungs (at bits=8 the last one, the default when no coarse rung fits)."""
    x = vectors(64, 48, seed=7).reshape(2, 3, 8, 64)
    x[0, 0, :4] = np.ones((4, 64), np.float32) * np.array([[1], [-1], [0.25], [6]], np.float32)
    check_encode(64, bits, x, rotation="none")


def test_encode_leading_axes_stay_dynamic():
    sess = session(64, 3, "encode")
    for shape in [(1, 1, 1, 64), (2, 3, 5, 64), (1, 2, 17, 64)]:
        x = vectors(64, int(np.prod(shape[:-1])), seed=len(shape) + shape[2]).reshape(shape)
        expected = quantizer(64, 3).encode(x)
        out = run(sess, x=x)
        assert all(np.array_equal(out[k], expected[k]) for k in expected.arrays)


def test_model_needs_opset_18():
    model = latkv.onnx.export(quantizer(64, 4), "encode")
    assert e8_graph.OPSET == 18
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


# -- the pieces: nearest_e8 and the single float16 rounding -----------------------------------


def piece_session(build, in_dtype: str, width: int | None):
    g = Graph("piece")
    x = g.input("x", in_dtype, ["n"] + ([width] if width else []))
    g.output(build(g, x), "y", "float32", None)
    return ort.InferenceSession(g.model(e8_graph.OPSET).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def test_nearest_e8_graph_follows_the_library_tie_rules():
    rng = np.random.default_rng(11)
    x = np.concatenate([
        rng.normal(0, 3, (3000, 8)),
        rng.integers(-8, 9, (3000, 8)) / 2,          # every coordinate a rounding tie
        rng.integers(-16, 17, (3000, 8)) / 4,        # equidistant D8 / D8 + 1/2 candidates
        np.zeros((1, 8)), np.full((1, 8), 0.25), np.full((1, 8), -0.5),
        rng.normal(0, 1e5, (100, 8)), rng.normal(0, 1e-30, (100, 8)),
    ]).astype(np.float32)
    (points,) = piece_session(e8_graph.nearest_e8, "float32", 8).run(None, {"x": x})
    assert np.array_equal(points, nearest_e8(x, backend="numpy"))


def test_float16_rounding_is_single():
    """onnxruntime's Cast double -> float16 rounds twice; the graph's rounding equals NumPy's
    on the exact midpoints between float16 values and their float64 neighbours."""
    below = np.arange(0, 0x7BFF, 37, dtype=np.uint16).view(np.float16).astype(np.float64)
    above = (np.arange(0, 0x7BFF, 37, dtype=np.uint16) + 1).view(np.float16).astype(np.float64)
    midpoints = (below + above) / 2
    value = np.concatenate([midpoints, np.nextafter(midpoints, 0), np.nextafter(midpoints, 1),
                            below, [0.0, 2.0 ** -26, 65504.0, 65519.99, 65520.0, 1e6],
                            np.random.default_rng(2).uniform(0, 4, 20000)])
    (rounded,) = piece_session(e8_graph.float16_round, "float64", None).run(None, {"x": value})
    with np.errstate(over="ignore"):
        expected = value.astype(np.float16).astype(np.float32)
    assert np.array_equal(rounded, expected)


# -- decode and scores ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dim,bits", [(64, 2), (128, 4), (96, 3)])
def test_decode_matches_library(dim, bits, dtype):
    qz = quantizer(dim, bits)
    x = vectors(dim, 2 * 3 * 6, seed=dim * bits).reshape(2, 3, 6, dim).astype(dtype)
    codes = qz.encode(x)
    (x_hat,) = run(session(dim, bits, "decode", dtype), **codes.arrays).values()
    expected = qz.decode(codes)
    assert x_hat.dtype == expected.dtype and x_hat.shape == expected.shape
    # the same float32 operations; a different runtime may differ by float32 roundings, and
    # the float16 output by one float16 rounding of those
    magnitude = np.abs(expected.astype(np.float32)).max(axis=-1, keepdims=True)
    step = EPS32 if dtype == "float32" else float(np.finfo(np.float16).eps)
    assert (np.abs(x_hat.astype(np.float32) - expected.astype(np.float32))
            <= 8 * step * magnitude).all()


@pytest.mark.parametrize("dim,bits", [(64, 3), (128, 2), (96, 4)])
def test_scores_match_library(dim, bits):
    qz = quantizer(dim, bits)
    rng = np.random.default_rng(dim + bits)
    x = vectors(dim, 2 * 3 * 5, seed=bits).reshape(2, 3, 5, dim)
    q = rng.standard_normal((2, 3, 4, dim)).astype(np.float32)
    codes = qz.encode(x)
    (scores,) = run(session(dim, bits, "scores"), q=q, **codes.arrays).values()
    expected = qz.scores(q, codes)
    assert scores.shape == expected.shape == (2, 3, 4, 5)
    # a dot product of length dim summed in another order: |error| <= dim eps |q| |k_hat|
    q_norm = np.linalg.norm(q, axis=-1)[..., :, None]
    k_norm = np.linalg.norm(qz.decode(codes), axis=-1)[..., None, :]
    bound = 2 * dim * EPS32 * q_norm * k_norm + 1e-30
    assert (np.abs(scores - expected) <= bound).all()


# -- refused forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["encode", "decode", "scores"])
def test_entropy_coded_form_is_refused(what):
    coded = latkv.E8Quant(dim=64, bits=2.5, entropy=True)
    with pytest.raises(ValueError, match=r"rANS.*flavour='custom'"):
        latkv.onnx.export(coded, what)


def test_local_statistics_are_refused():
    with pytest.raises(ValueError, match="local_stats"):
        latkv.onnx.export(latkv.E8Quant(dim=64, bits=4, center=True, local_stats=True),
                          "encode")

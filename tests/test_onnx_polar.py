"""PolarQuant's standard ONNX graphs: angle codes and radii bit-identical to ``encode`` (several
depths and bit allocations, dims 64, 128 and non-powers of two, float32 and float16 inputs,
rank 2 and 4, dynamic axes), also on adversarial rotated vectors (signed zeros, infinities,
NaN, ties, huge and subnormal values, float32 pairs within hundredths of a float64 rounding of
a code threshold); decode and scores within float32 rounding."""

from __future__ import annotations

from fractions import Fraction
from functools import cache

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import latkv
import latkv.onnx
from latkv._backend import implementation
from latkv.onnx import polar as polar_graph
from latkv.onnx.graph import Graph

EPS32 = float(np.finfo(np.float32).eps)

#: (spec, dim): default allocation, shallower and deeper recursions, 8-bit and 1-bit levels,
#: float32 radii, the dense rotation, frozen channel statistics; dims 48 and 96 are not powers
#: of two (two overlapping Hadamard blocks)
CONFIGS = [
    ("polar:4", 128),
    ("polar:4", 48),
    ("polar:3,level_bits=3-2-2", 64),
    ("polar:2,level_bits=8-1", 64),
    ("polar:1,level_bits=5", 64),
    ("polar:4,level_bits=1-4-3-2,radius_dtype=float32", 96),
    ("polar:5,rotation=dense", 64),
    ("polar:4,center=True,channel_scale=True", 64),
]


@cache
def session(spec: str, dim: int, what: str, dtype: str = "float32",
            leading: tuple[str, ...] = ("batch", "heads", "tokens")):
    qz = latkv.quantizer(spec, dim=dim)
    return latkv.onnx.session(latkv.onnx.export(qz, what, dtype=dtype, leading=leading))


def run(sess, **feeds) -> dict[str, np.ndarray]:
    return dict(zip([output.name for output in sess.get_outputs()], sess.run(None, feeds)))


def assert_bit_identical(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(arrays) == list(expected)
    for name, array in arrays.items():
        assert array.dtype == expected[name].dtype, name
        assert array.shape == expected[name].shape, name
        np.testing.assert_array_equal(array.view(np.uint8), expected[name].view(np.uint8),
                                      err_msg=name)


def scores_tolerance(q: np.ndarray, x_hat: np.ndarray) -> float:
    """float32 rounding of a dot product of ``dim`` terms: dim * eps * |q| |x_hat|."""
    return 4 * q.shape[-1] * EPS32 * (np.linalg.norm(q, axis=-1).max()
                                      * np.linalg.norm(x_hat, axis=-1).max())


def decode_tolerance(x_hat: np.ndarray) -> float:
    """The inverse rotation's float32 sums: dim * eps * |x_hat| per coordinate (0 where the
    Hadamard butterflies repeat the library's)."""
    return 2 * x_hat.shape[-1] * EPS32 * np.linalg.norm(x_hat, axis=-1).max()


def sample(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian rows of varied scale, one zero vector and a few signed zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.1, 9, (*shape[:-1], 1))
    x = x.astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0] = 0.0
    flat[-1, ::3] = -0.0
    return x


@pytest.mark.parametrize("spec, dim", CONFIGS)
def test_encode_decode_scores_match_the_library(spec, dim):
    qz = latkv.quantizer(spec, dim=dim)
    x = sample((2, 3, 37, dim), dim)
    codes = qz.encode(x)
    assert_bit_identical(run(session(spec, dim, "encode"), x=x), dict(codes.arrays))
    x_hat = qz.decode(codes)
    decoded = run(session(spec, dim, "decode"), **codes.arrays)["x_hat"]
    np.testing.assert_allclose(decoded, x_hat, rtol=0, atol=decode_tolerance(x_hat))
    q = np.random.default_rng(dim + 1).standard_normal((2, 3, 4, dim)).astype(np.float32)
    scores = run(session(spec, dim, "scores"), q=q, **codes.arrays)["scores"]
    np.testing.assert_allclose(scores, qz.scores(q, codes), rtol=0,
                               atol=scores_tolerance(q, x_hat))


@pytest.mark.parametrize("spec, dim", [("polar:4", 128), ("polar:3,level_bits=4-3-3", 48)])
def test_float16_inputs_of_rank_two(spec, dim):
    qz = latkv.quantizer(spec, dim=dim)
    x = sample((300, dim), 7).astype(np.float16)
    codes = qz.encode(x)
    leading = ("tokens",)
    assert_bit_identical(run(session(spec, dim, "encode", "float16", leading), x=x),
                         dict(codes.arrays))
    decoded = run(session(spec, dim, "decode", "float16", leading), **codes.arrays)["x_hat"]
    assert decoded.dtype == np.float16
    x_hat = qz.decode(codes).astype(np.float32)
    np.testing.assert_allclose(decoded.astype(np.float32), x_hat, rtol=0,
                               atol=float(np.finfo(np.float16).eps) * np.abs(x_hat).max())


def test_one_graph_serves_any_batch_and_token_count():
    qz = latkv.PolarQuant(dim=64, levels=3)
    sess = session(qz.spec, 64, "encode")
    for shape in [(1, 1, 1, 64), (3, 2, 129, 64)]:
        x = sample(shape, len(shape) + shape[-2])
        assert_bit_identical(run(sess, x=x), dict(qz.encode(x).arrays))


def test_local_statistics_have_no_standard_graph():
    qz = latkv.PolarQuant(dim=64, center=True, local_stats=True)
    with pytest.raises(ValueError, match="flavour='custom'"):
        latkv.onnx.export(qz, "encode")


# -- adversarial rotated vectors: the codes without an angle -----------------------------------


@cache
def codes_session(spec: str, dim: int):
    """`polar_graph.polar_encode` alone: rotated ``y : (n, dim)`` float32 in, arrays out."""
    stage = latkv.quantizer(spec, dim=dim).stages()[0]
    g = Graph("polar_codes")
    y = g.input("y", "float32", ["n", dim])
    arrays = polar_graph.polar_encode(g, stage, y)
    for name, value in arrays.items():
        g.output(value, name, stage.radius_dtype if name == "radius" else "uint8", None)
    return ort.InferenceSession(g.model(polar_graph.OPSET).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def best_approximations(target: Fraction, limit: int = 1 << 24) -> list[tuple[int, int]]:
    """Convergents and upper semiconvergents ``p / q`` of ``target > 0``, ``p, q < limit``:
    the float32 pairs ``(q, p)`` whose angle is closest to ``arctan(target)``."""
    found = []
    h0, h1, k0, k1 = 0, 1, 1, 0
    x = target
    while True:
        whole = x.numerator // x.denominator
        largest = min(whole, (limit - 1 - h0) // max(h1, 1), (limit - 1 - k0) // max(k1, 1))
        for t in range(max(1, whole // 2, largest - 8), largest + 1):
            found.append((t * h1 + h0, t * k1 + k0))
        h, k = whole * h1 + h0, whole * k1 + k0
        if h >= limit or k >= limit or x == whole:
            return found
        h0, h1, k0, k1 = h1, h, k1, k
        x = 1 / (x - whole)


def near_threshold_pairs(threshold: Fraction) -> list[tuple[float, float]]:
    """Float32 pairs ``(a, b)`` whose angle is as close to ``threshold`` as float32 allows
    (tenths of a float64 rounding, for some), at three magnitudes."""
    cosine, sine = polar_graph._cos_sin(threshold)
    pairs = []
    for p, q in best_approximations(abs(Fraction(sine, cosine)))[-8:]:
        a, b = float(q) * np.sign(cosine), float(p) * np.sign(sine)
        pairs += [(a * scale, b * scale) for scale in (1.0, 2.0**-110, 2.0**90)]
    return pairs


def adversarial_rows(stage) -> np.ndarray:
    dim = stage.dim
    rows = []

    def row(**entries):
        y = np.zeros(dim, np.float32)
        for index, value in entries.items():
            y[int(index[1:])] = value
        rows.append(y)

    special = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3e38, -3e38]
    for a in special:                    # level 1: atan2's signed zeros, infinities, NaN
        for b in special:
            row(i0=a, i1=b)
            rows.append(np.where(np.arange(dim) % 2, np.float32(b), np.float32(a)))
    boundaries = stage.codebooks[0].boundaries.astype(np.float64)
    for boundary in boundaries:          # level 1: both thresholds of every boundary
        for threshold in (polar_graph._upper_threshold(boundary),
                          polar_graph._lower_threshold(boundary)):
            if threshold is not None and abs(float(threshold)) < np.pi:
                for a, b in near_threshold_pairs(threshold):
                    row(i0=a, i1=b, i2=np.nextafter(np.float32(a), np.float32(np.inf)), i3=b)
    for level in range(2, stage.levels + 1):  # radii |y_0| and |y_half| of a block, exactly
        half = 1 << (level - 1)
        for boundary in stage.codebooks[level - 1].boundaries.astype(np.float64):
            for a, b in near_threshold_pairs(polar_graph._upper_threshold(boundary)):
                row(i0=-a, **{f"i{half}": b})
        for a, b in [(1, 1), (0, 0), (-0.0, 0), (np.inf, 1), (np.inf, np.inf), (1, np.inf),
                     (np.nan, 1), (3e38, 3e38), (1e-45, 1e-45)]:
            row(i0=a, **{f"i{half}": b})
    rng = np.random.default_rng(stage.dim)
    ties = rng.choice(np.float32([0, -0.0, 1, -1, 2, 0.5]), (500, dim))
    magnitudes = np.float32(10.0) ** rng.integers(-40, 38, (2000, 1)).astype(np.float32)
    gaussian = rng.standard_normal((2000, dim)).astype(np.float32) * magnitudes
    return np.concatenate([np.array(rows, np.float32), ties, gaussian])


@pytest.mark.parametrize("spec, dim", [("polar:4", 16), ("polar:2,level_bits=8-8", 4),
                                       ("polar:3,level_bits=1-3-8,radius_dtype=float32", 8)])
def test_codes_without_an_angle_equal_the_kernels_on_adversarial_vectors(spec, dim):
    stage = latkv.quantizer(spec, dim=dim).stages()[0]
    y = adversarial_rows(stage)
    encoded = run(codes_session(spec, dim), y=y)
    boundaries = tuple(c.boundaries.astype(np.float64) for c in stage.codebooks)
    for backend in ("numpy", "numba"):
        with np.errstate(all="ignore"):
            packed, radius = implementation("polar_quantize", backend)(
                y, stage.levels, stage.level_bits, boundaries)
            expected = {f"level{level}": codes for level, codes in enumerate(packed, start=1)}
            expected["radius"] = radius.astype(stage.radius_dtype)
        assert_bit_identical(encoded, expected)


def test_thresholds_are_the_rounding_midpoints():
    """A threshold's direction is its cosine and sine to ~78 bits, and a float64 angle
    (+ 2 pi at level 1 when negative) passes the boundary right beyond the threshold."""
    boundary = float(np.float32(11 * np.pi / 8))
    upper = polar_graph._upper_threshold(boundary)
    assert float(upper) == boundary and upper > boundary
    lower = polar_graph._lower_threshold(boundary)
    below, above = (float(lower - Fraction(1, 2**60)), float(lower + Fraction(1, 2**60)))
    assert not below + 2 * np.pi > boundary and above + 2 * np.pi > boundary
    assert polar_graph._lower_threshold(float(np.float32(np.pi / 3))) is None
    table = polar_graph.direction_table(2, (0.5,))
    cosine, sine = Fraction(0), Fraction(0)
    for piece in range(polar_graph.PIECES):
        cosine += Fraction(table[0, piece])
        sine -= Fraction(table[0, polar_graph.PIECES + piece])
    assert abs(float(cosine) - np.cos(float(upper_half := polar_graph._upper_threshold(0.5)))) \
        <= 2 * np.spacing(1.0)
    assert abs(float(sine) - np.sin(float(upper_half))) <= 2 * np.spacing(1.0)
    assert abs(cosine**2 + sine**2 - 1) < 2.0**-74
    mantissas = np.frexp(table[0])[0] * 2.0**polar_graph.PIECE_BITS   # at most 26 bits each
    np.testing.assert_array_equal(mantissas, np.round(mantissas))

"""ScalarQuant's standard ONNX graphs: packed codes, scales and zeros bit-identical to
``encode`` (token and channel groups, short last groups, float16 inputs, dynamic axes, signed
zeros, constant groups, subnormal and near-65504 ranges); decode and scores within float32
rounding; the float16 directed roundings exact on every finite float16 and its neighbours."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import onnx

import latkv
import latkv.onnx
from latkv.onnx import scalar as scalar_graph
from latkv.onnx.graph import Graph, onnx_type
from latkv.scalar import scale_and_zero

EPS32 = float(np.finfo(np.float32).eps)
FLOAT16_MAX = float(np.finfo(np.float16).max)

#: (bits, group, axis, dim): groups dividing dim or not, token counts not a multiple of group
CONFIGS = [
    (4, 32, "token", 64),
    (3, 5, "token", 24),
    (1, 7, "token", 16),
    (8, 16, "token", 40),
    (2, 4, "channel", 16),
    (5, 8, "channel", 24),
    (6, 1, "channel", 8),
    (7, 32, "channel", 16),
]


@cache
def session(bits: int, group: int, axis: str, dim: int, what: str, dtype: str = "float32",
            leading: tuple[str, ...] = ("batch", "heads", "tokens")):
    qz = latkv.ScalarQuant(dim=dim, bits=bits, group=group, axis=axis)
    return latkv.onnx.session(latkv.onnx.export(qz, what, dtype=dtype, leading=leading))


def run(sess, **feeds) -> dict[str, np.ndarray]:
    names = [output.name for output in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def assert_encodes_like_the_library(qz, sess, x):
    codes = qz.encode(x)
    encoded = run(sess, x=x)
    assert list(encoded) == list(codes.arrays)
    for name, array in encoded.items():
        assert array.dtype == codes[name].dtype, name
        assert array.shape == codes[name].shape, name
        # bit patterns, so that -0.0 and +0.0 differ
        np.testing.assert_array_equal(array.view(np.uint8), codes[name].view(np.uint8),
                                      err_msg=name)
    return codes


def scores_tolerance(q, x_hat):
    """float32 rounding of dot products of ``dim`` terms: a few ``dim eps |q| |x_hat|``."""
    dim = q.shape[-1]
    return 4 * dim * EPS32 * (np.linalg.norm(q.astype(np.float32), axis=-1).max()
                              * np.linalg.norm(x_hat.astype(np.float32), axis=-1).max())


def inputs(rng, shape):
    """Gaussian rows with varied scales and offsets."""
    scales = rng.uniform(0.1, 9, (*shape[:-1], 1))
    offsets = rng.uniform(-3, 3, (*shape[:-1], 1))
    return rng.standard_normal(shape) * scales + offsets


@pytest.mark.parametrize("bits, group, axis, dim", CONFIGS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encode_decode_scores_match_the_library(bits, group, axis, dim, dtype):
    qz = latkv.ScalarQuant(dim=dim, bits=bits, group=group, axis=axis)
    rng = np.random.default_rng(bits * 100 + dim)
    encoder = session(bits, group, axis, dim, "encode", dtype)
    # dynamic axes: one session, several leading shapes and token counts
    for shape in [(2, 3, 13, dim), (1, 2, 32, dim), (1, 1, 1, dim)]:
        x = inputs(rng, shape).astype(dtype)
        codes = assert_encodes_like_the_library(qz, encoder, x)
    x = inputs(rng, (2, 3, 13, dim)).astype(dtype)
    codes = assert_encodes_like_the_library(qz, encoder, x)
    decoded = run(session(bits, group, axis, dim, "decode", dtype), **codes.arrays)["x_hat"]
    x_hat = qz.decode(codes)
    assert decoded.dtype == x_hat.dtype
    np.testing.assert_allclose(decoded.astype(np.float32), x_hat.astype(np.float32),
                               rtol=float(np.finfo(dtype).eps), atol=1e-6)
    q = rng.standard_normal((2, 3, 4, dim)).astype(dtype)
    scores = run(session(bits, group, axis, dim, "scores", dtype), q=q, **codes.arrays)["scores"]
    reference = qz.scores(q, codes)
    assert scores.dtype == np.float32 and scores.shape == (2, 3, 4, 13)
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=scores_tolerance(q, x_hat))


@pytest.mark.parametrize("bits, group, axis, dim", [CONFIGS[1], CONFIGS[5]])
def test_rank_two_inputs(bits, group, axis, dim):
    qz = latkv.ScalarQuant(dim=dim, bits=bits, group=group, axis=axis)
    rng = np.random.default_rng(7)
    leading = ("tokens",)
    encoder = session(bits, group, axis, dim, "encode", leading=leading)
    for tokens in (29, 8, 1):
        codes = assert_encodes_like_the_library(
            qz, encoder, inputs(rng, (tokens, dim)).astype(np.float32))
    decoded = run(session(bits, group, axis, dim, "decode", leading=leading),
                  **codes.arrays)["x_hat"]
    np.testing.assert_allclose(decoded, qz.decode(codes), rtol=EPS32, atol=1e-6)
    q = rng.standard_normal((3, dim)).astype(np.float32)
    scores = run(session(bits, group, axis, dim, "scores", leading=leading), q=q,
                 **codes.arrays)["scores"]
    np.testing.assert_allclose(scores, qz.scores(q, codes), rtol=1e-5,
                               atol=scores_tolerance(q, qz.decode(codes)))


#: groups of 4 that stress `scale_and_zero`: constant groups (scale 0), signed zeros, float32
#: subnormal ranges (the step underflows to 0: the extra fp16 step), float16 subnormal ranges,
#: values and ranges near 65504, ties of the rounding
SPECIAL_GROUPS = np.array([
    [1.5, 1.5, 1.5, 1.5],
    [0.0, 0.0, 0.0, 0.0],
    [-0.0, 0.0, -0.0, 0.0],
    [-0.0, -0.0, -0.0, -0.0],
    [0.0, -0.0, 1.0, 2.0],
    [-3.0, -0.0, 0.0, -1.0],
    [0.0, 1e-45, 0.0, 1e-45],
    [-1e-45, 0.0, -0.0, 1e-45],
    [1e-7, 2e-7, -3e-8, 5e-8],
    [-1e-40, 1e-40, 3e-41, 0.0],
    [65504.0, 65000.0, 65504.0, 64000.0],
    [-65504.0, -65504.0, -60000.0, -65000.0],
    [-65504.0, 65504.0, 0.0, 1.0],
    [-65504.0, 1e-3, -1e-3, 65504.0],
    [0.0, 0.5, 1.0, 1.5],
    [100.1, 100.2, 100.3, 100.4],
], dtype=np.float32)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_special_groups_match_the_library(bits, axis):
    """Token groups: each row holds four groups; channel groups: the transpose, so each channel
    holds four groups of four tokens."""
    rng = np.random.default_rng(bits)
    rows = np.concatenate([SPECIAL_GROUPS.reshape(4, 16),
                           SPECIAL_GROUPS[rng.permutation(16)].reshape(4, 16)])  # (8, 16)
    x = rows if axis == "token" else np.ascontiguousarray(rows.T)
    qz = latkv.ScalarQuant(dim=x.shape[-1], bits=bits, group=4, axis=axis)
    sess = latkv.onnx.session(latkv.onnx.export(qz, "encode", leading=("tokens",)))
    codes = assert_encodes_like_the_library(qz, sess, x)
    assert (codes["scale"] == 0).any()                        # constant groups
    assert (codes["scale"].view(np.uint16) == 1).any()        # the extra fp16 step (2^-24)
    assert (np.abs(codes["zero"].astype(np.float32)) == FLOAT16_MAX).any()
    decoded = latkv.onnx.session(latkv.onnx.export(qz, "decode", leading=("tokens",))).run(
        None, dict(codes.arrays))[0]
    np.testing.assert_allclose(decoded, qz.decode(codes), rtol=EPS32, atol=0)


def scale_and_zero_session(bits: int):
    """A graph of `latkv.onnx.scalar.scale_and_zero` alone: float32 minima and maxima in,
    float16 scales and zeros out."""
    g = Graph("scale_and_zero")
    minimum = g.input("minimum", "float32", ["n"])
    maximum = g.input("maximum", "float32", ["n"])
    scale, zero = scalar_graph.scale_and_zero(g, minimum, maximum, bits)
    g.output(g.op("Cast", scale, to=onnx_type("float16")), "scale", "float16", ["n"])
    g.output(g.op("Cast", zero, to=onnx_type("float16")), "zero", "float16", ["n"])
    return plain_session(g)


def plain_session(g: Graph):
    model = g.model(scalar_graph.OPSET)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_scale_and_zero_match(bits, minimum, maximum):
    scale, zero = scale_and_zero_session(bits).run(None, {"minimum": minimum,
                                                          "maximum": maximum})
    expected_scale, expected_zero = scale_and_zero(minimum, maximum, bits)
    np.testing.assert_array_equal(scale.view(np.uint16), expected_scale.view(np.uint16))
    np.testing.assert_array_equal(zero.view(np.uint16), expected_zero.view(np.uint16))


def every_float16_and_neighbours():
    """Every finite float16 as float32, the float32 values on either side, and the float32
    midpoints between neighbouring float16 values with their neighbours (within +-65504)."""
    finite = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(finite[np.isfinite(finite)].astype(np.float32))
    midpoints = (finite[:-1] + (finite[1:] - finite[:-1]) / np.float32(2)).astype(np.float32)
    values = np.concatenate([finite, midpoints])
    up = np.nextafter(values, np.float32(np.inf))
    down = np.nextafter(values, np.float32(-np.inf))
    values = np.unique(np.concatenate([values, up, down, np.float32([1e-45, -1e-45])]))
    return values[np.abs(values) <= FLOAT16_MAX]


def test_zero_rounds_down_exactly_on_every_float16_neighbourhood():
    """Constant groups ``min = max = v``: the zero is the largest float16 ``<= v``."""
    values = every_float16_and_neighbours()
    assert_scale_and_zero_match(4, values, values)


def test_scale_rounds_up_exactly_on_every_float16_neighbourhood():
    """``min = 0`` and one level (1 bit): the scale is the smallest float16 ``>= max``."""
    values = np.abs(every_float16_and_neighbours())
    assert_scale_and_zero_match(1, np.zeros_like(values), values)


def test_next_float16_up_on_every_nonnegative_float16():
    g = Graph("next_float16_up")
    value = g.input("value", "float32", ["n"])
    g.output(g.op("Cast", scalar_graph.next_float16_up(g, value), to=onnx_type("float16")),
             "next", "float16", ["n"])
    finite = np.arange(0x7C00, dtype=np.uint16).view(np.float16)     # +0 .. 65504
    (following,) = plain_session(g).run(None, {"value": finite.astype(np.float32)})
    with np.errstate(over="ignore"):                                # 65504 -> inf
        expected = np.nextafter(finite, np.float16(np.inf))
    np.testing.assert_array_equal(following.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("bits", range(1, 9))
def test_scale_and_zero_on_random_ranges(bits):
    rng = np.random.default_rng(bits)
    count = 20000
    minimum = (rng.standard_normal(count) * 10.0 ** rng.uniform(-9, 3.5, count))
    width = np.abs(rng.standard_normal(count)) * 10.0 ** rng.uniform(-12, 3.5, count)
    maximum = np.minimum(minimum + width, 30000.0).astype(np.float32)
    minimum = minimum.astype(np.float32)
    maximum = np.maximum(maximum, minimum)
    assert_scale_and_zero_match(bits, minimum, maximum)


def test_graphs_pass_the_checker_and_strict_shape_inference():
    qz = latkv.ScalarQuant(dim=24, bits=3, group=8, axis="channel")
    for what in ("encode", "decode", "scores", "attention"):
        model = latkv.onnx.export(qz, what)
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        assert model.opset_import[0].version == scalar_graph.OPSET
        assert {node.domain for node in model.graph.node} <= {""}


def test_attention_with_channel_keys_and_token_values_matches_the_library():
    """KIVI's pairing: keys per channel (groups of tokens), values per token."""
    keys = latkv.ScalarQuant(dim=32, bits=2, group=8, axis="channel")
    values = latkv.ScalarQuant(dim=32, bits=2, group=12, axis="token")
    rng = np.random.default_rng(11)
    k = rng.standard_normal((1, 2, 19, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 19, 32)).astype(np.float32)
    q = rng.standard_normal((1, 2, 3, 32)).astype(np.float32)
    key_codes, value_codes = keys.encode(k), values.encode(v)
    sess = latkv.onnx.session(latkv.onnx.export(keys, "attention", values=values))
    feeds = {"q": q, **{f"key_{name}": a for name, a in key_codes.arrays.items()},
             **{f"value_{name}": a for name, a in value_codes.arrays.items()}}
    (output,) = sess.run(None, feeds)
    logits = keys.scores(q, key_codes) / np.sqrt(32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = weights @ values.decode(value_codes)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5)


def test_every_configuration_is_accepted():
    for axis in ("token", "channel"):
        scalar_graph.check(latkv.ScalarQuant(dim=5, bits=1, group=5, axis=axis))

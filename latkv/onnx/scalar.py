"""`latkv.ScalarQuant` (KIVI min-max scalar quantization) as standard ONNX ops.

Encode (KIVI, Liu et al. 2024, Sec. 3; `latkv.scalar`): the float32 minimum and maximum of every
group (``axis="token"``: ``group`` consecutive channels of a vector, the last group shorter when
``group`` does not divide ``dim``; ``axis="channel"``: ``group`` consecutive tokens of a channel,
the last group shorter when it does not divide the dynamic token count), then
`latkv.scalar.scale_and_zero` and `latkv.scalar.quantize` with the library's float32 operations
in its order, and the codes packed LSB-first. The short last group is padded by repeating its last
element, as the library does, which keeps its minimum and maximum.

The library's directed float16 roundings (the nearest float16, then one step via the bit
pattern) become exact float32 arithmetic on the float16 spacing of the value's binade,
``q = 2^(e - 10)`` for ``|v|`` in ``[2^e, 2^(e+1))`` with ``e >= -14`` and ``q = 2^-24`` below:

- ``zero = floor(m / q) q``: the largest float16 ``<= m``;
- ``scale = ceil(s / q) q``: the smallest float16 ``>= s``;
- the next float16 above a float16 ``h >= 0`` is ``h + q(h)``;

every product and quotient by the power of two ``q`` is exact, so the stored bits are the
library's (`tests/test_onnx_scalar.py` checks this on every finite float16 and the float32
values beside each). The binade is a count of comparisons with powers of two, so the graph needs
no BitCast and runs at opset 18.

Decode works in the input's own domain (``rotate`` and ``unrotate`` are the identity):
``rotated_decode = code * scale + zero`` with each group's scale and zero gathered per element.

Inputs the library refuses with a ``ValueError`` cannot raise inside a graph, and are not
detected: for values beyond the float16 range (``|x| > 65504``) or a group whose step
``(max - zero) / L`` is beyond it, the graph still writes codes, with an ``inf`` zero or scale
wherever float16 cannot hold them (a minimum below -65504, or ``max - min > 65504`` at 1 bit);
NaN gives meaningless codes. Every input the library accepts gets the library's bits.
"""

from __future__ import annotations

import numpy as np

from latkv.onnx.graph import (
    Graph,
    leading_shape,
    onnx_type,
    pack_bits,
    restore_rows,
    rows,
    unpack_bits,
)
from latkv.scalar import ScalarQuant

OPSET = 18

#: the powers of two ``2^-13 .. 2^15`` that start float16 binades with a new spacing
FLOAT16_BINADE_STARTS = (2.0 ** np.arange(-13, 16)).astype(np.float32)
#: the float16 spacing below the first start (subnormals and ``[2^-14, 2^-13)``) and from each
FLOAT16_SPACINGS = (2.0 ** (np.arange(-14, 16) - 10)).astype(np.float32)


def check(qz: ScalarQuant) -> None:
    """Every configuration of ``ScalarQuant`` has a standard graph: nothing to refuse."""



def _scalar_int64(g: Graph, vector: str) -> str:
    """A one-element int64 vector as a scalar (what Range takes)."""
    return g.op("Reshape", vector, g.constant(np.zeros(0, np.int64)))


# -- float16 rounding in float32 (latkv.scalar.scale_and_zero, latkv._cpu.float16) ----------------


def float16_spacing(g: Graph, value: str) -> str:
    """The float16 spacing of the binade of float32 ``|value|`` (``2^-24`` below ``2^-13``,
    ``2^5`` from ``2^15`` on), elementwise."""
    magnitude = g.op("Unsqueeze", g.op("Abs", value), g.axes(-1))
    reached = g.op("GreaterOrEqual", magnitude,
                   g.constant(FLOAT16_BINADE_STARTS, "float16_binade_starts"))
    binade = g.op("ReduceSum", g.op("Cast", reached, to=onnx_type("int64")), g.axes(-1),
                  keepdims=0)
    return g.op("Gather", g.constant(FLOAT16_SPACINGS, "float16_spacings"), binade, axis=0,
                hint="spacing")


def round_down_float16(g: Graph, value: str) -> str:
    """The largest float16 ``<= value`` as an exact float32 (``-inf`` once cast when below
    -65504)."""
    spacing = float16_spacing(g, value)
    return g.op("Mul", g.op("Floor", g.op("Div", value, spacing)), spacing, hint="rounded_down")


def round_up_float16(g: Graph, value: str) -> str:
    """The smallest float16 ``>= value`` as an exact float32 (``inf`` once cast when above
    65504)."""
    spacing = float16_spacing(g, value)
    return g.op("Mul", g.op("Ceil", g.op("Div", value, spacing)), spacing, hint="rounded_up")


def next_float16_up(g: Graph, value: str) -> str:
    """The float16 after a float16 ``value >= 0`` as an exact float32 (``+0`` -> ``2^-24``;
    `latkv.scalar._next_float16_up`)."""
    return g.op("Add", value, float16_spacing(g, value), hint="next_up")


def positive_zeros(g: Graph, value: str) -> str:
    """``value`` with ``-0.0`` made ``+0.0`` (``value + 0.0``).

    Not an ``Add`` of ``0.0``: onnxruntime's basic graph optimizations remove it as a no-op,
    which keeps ``-0.0``.
    """
    positive_zero = g.constant(np.float32(0.0))
    return g.op("Where", g.op("Equal", value, positive_zero), positive_zero, value,
                hint="unsigned_zero")


def scale_and_zero(g: Graph, minimum: str, maximum: str, bits: int) -> tuple[str, str]:
    """`latkv.scalar.scale_and_zero`: float32 group minima and maxima -> ``(scale, zero)``,
    float32 values that are exactly the library's float16 ones."""
    levels = g.constant(np.float32((1 << bits) - 1), "levels")
    # signed zeros made +0.0 (the library's minimum + 0.0), so the stored bits never depend on
    # the reduction
    minimum = positive_zeros(g, minimum)
    maximum = positive_zeros(g, maximum)
    # KIVI's zero point: the fp16 minimum rounded down, so the grid starts at or below it
    zero = round_down_float16(g, minimum)
    # KIVI's step: the fp16 (max - zero) / L rounded up, so the grid reaches the maximum
    span = g.op("Sub", maximum, zero, hint="span")
    scale = round_up_float16(g, g.op("Div", span, levels, hint="step"))
    # one fp16 step more where float32 rounding of the division left scale * L < span
    short = g.op("Less", g.op("Mul", scale, levels), span)
    scale = g.op("Where", short, next_float16_up(g, scale), scale, hint="scale")
    return scale, zero


def quantize(g: Graph, x: str, scale: str, zero: str, bits: int) -> str:
    """`latkv.scalar.quantize`: ``clip(rint((x - zero) / safe_scale), 0, L)`` as uint8 (float32
    operands that broadcast; a zero scale, a constant group, divides by 1)."""
    zero_scale = g.op("Equal", scale, g.constant(np.float32(0.0)))
    safe_scale = g.op("Where", zero_scale, g.constant(np.float32(1.0)), scale)
    # ONNX Round is round-half-to-even, as np.rint
    rounded = g.op("Round", g.op("Div", g.op("Sub", x, zero), safe_scale))
    clipped = g.op("Clip", rounded, g.constant(np.float32(0.0)),
                   g.constant(np.float32((1 << bits) - 1)))
    return g.op("Cast", clipped, to=onnx_type("uint8"), hint="codes")


def _float16(g: Graph, value: str) -> str:
    """An exact-float16 float32 value cast to float16 (no rounding happens)."""
    return g.op("Cast", value, to=onnx_type("float16"))


# -- the group layouts ----------------------------------------------------------------------------


def _group_count(qz: ScalarQuant) -> int:
    """Groups of channels per vector (``axis="token"``)."""
    return -(-qz.dim // qz.group)


def _channel_groups(qz: ScalarQuant) -> np.ndarray:
    """The group of each channel, ``j // group`` (``axis="token"``)."""
    return np.arange(qz.dim, dtype=np.int64) // qz.group


def _token_groups(g: Graph, qz: ScalarQuant, tokens: str) -> str:
    """The group of each token, ``t // group`` for ``t < tokens`` (``axis="channel"``)."""
    token_range = g.op("Range", g.constant(np.int64(0)), _scalar_int64(g, tokens),
                       g.constant(np.int64(1)))
    return g.op("Div", token_range, g.constant(np.int64(qz.group)), hint="token_groups")


def _encode_token(g: Graph, qz: ScalarQuant, x: str) -> dict[str, str]:
    """Groups of ``group`` channels per vector (KIVI's value quantization)."""
    lead = leading_shape(g, x)
    vectors = rows(g, x, qz.dim)                                   # (rows, dim)
    groups = _group_count(qz)
    padded = vectors
    if groups * qz.group != qz.dim:                                # latkv.scalar._pad_to_groups
        edge = np.minimum(np.arange(groups * qz.group), qz.dim - 1).astype(np.int64)
        padded = g.op("Gather", vectors, g.constant(edge, "edge_channels"), axis=1)
    grouped = g.op("Reshape", padded, g.constant(np.array([-1, groups, qz.group], np.int64)))
    minimum = g.op("ReduceMin", grouped, g.axes(-1), keepdims=0)
    maximum = g.op("ReduceMax", grouped, g.axes(-1), keepdims=0)
    scale, zero = scale_and_zero(g, minimum, maximum, qz.bits)     # (rows, groups)
    channel_groups = g.constant(_channel_groups(qz), "channel_groups")
    codes = quantize(g, vectors, g.op("Gather", scale, channel_groups, axis=1),
                     g.op("Gather", zero, channel_groups, axis=1), qz.bits)
    return {
        "packed": restore_rows(g, pack_bits(g, codes, qz.bits, qz.dim), lead,
                               (qz.packed_bytes,)),
        "scale": restore_rows(g, _float16(g, scale), lead, (groups,)),
        "zero": restore_rows(g, _float16(g, zero), lead, (groups,)),
    }


def _encode_channel(g: Graph, qz: ScalarQuant, x: str) -> dict[str, str]:
    """Groups of ``group`` consecutive tokens per channel (KIVI's key quantization)."""
    shape = g.op("Shape", x)
    tokens = g.op("Shape", x, start=-2, end=-1)                    # [T]
    heads = g.op("Reshape", x, g.op("Concat", g.axes(-1), tokens,
                                    g.constant(np.array([qz.dim], np.int64)), axis=0))
    group = g.constant(np.array([qz.group], np.int64))
    token_groups = g.op("Div", g.op("Add", tokens, g.constant(np.array([qz.group - 1],
                                                                        np.int64))), group)
    padded = heads
    if qz.group > 1:                          # latkv.scalar._pad_to_groups: repeat the last token
        padded_range = g.op("Range", g.constant(np.int64(0)),
                            _scalar_int64(g, g.op("Mul", token_groups, group)),
                            g.constant(np.int64(1)))
        last_token = g.op("Sub", _scalar_int64(g, tokens), g.constant(np.int64(1)))
        padded = g.op("Gather", heads, g.op("Min", padded_range, last_token), axis=1)
    grouped = g.op("Reshape", padded, g.constant(np.array([0, -1, qz.group, qz.dim], np.int64)))
    minimum = g.op("ReduceMin", grouped, g.axes(2), keepdims=0)
    maximum = g.op("ReduceMax", grouped, g.axes(2), keepdims=0)
    scale, zero = scale_and_zero(g, minimum, maximum, qz.bits)     # (heads, groups, dim)
    group_of_token = _token_groups(g, qz, tokens)
    codes = quantize(g, heads, g.op("Gather", scale, group_of_token, axis=1),
                     g.op("Gather", zero, group_of_token, axis=1), qz.bits)
    codes = g.op("Reshape", codes, shape)                          # (..., tokens, dim)
    side_shape = g.op("Concat", g.op("Shape", x, end=-2), token_groups,
                      g.constant(np.array([qz.dim], np.int64)), axis=0)
    return {
        "packed": pack_bits(g, codes, qz.bits, qz.dim),
        "scale": g.op("Reshape", _float16(g, scale), side_shape, hint="scale"),
        "zero": g.op("Reshape", _float16(g, zero), side_shape, hint="zero"),
    }


# -- the module interface (latkv.onnx.standard) ---------------------------------------------------


def encode(g: Graph, qz: ScalarQuant, x: str) -> dict[str, str]:
    """``packed``, ``scale`` and ``zero`` of ``x : (..., dim)`` float32, bit-identical to
    ``qz.encode`` (``(..., tokens, dim)`` for ``axis="channel"``)."""
    if qz.axis == "token":
        return _encode_token(g, qz, x)
    return _encode_channel(g, qz, x)


def rotate(g: Graph, qz: ScalarQuant, q: str) -> str:
    """The identity: scalar codes are estimated in the input's own domain."""
    return q


def rotated_decode(g: Graph, qz: ScalarQuant, arrays: dict[str, str]) -> str:
    """``code * scale + zero : (..., n, dim)`` float32, each group's sides gathered per element
    (`ScalarQuant.decode`)."""
    packed = arrays["packed"]
    codes = g.op("Cast", unpack_bits(g, packed, qz.bits, qz.dim), to=onnx_type("float32"))
    scale = g.op("Cast", arrays["scale"], to=onnx_type("float32"))
    zero = g.op("Cast", arrays["zero"], to=onnx_type("float32"))
    if qz.axis == "token":                     # per-vector groups: channel j has group j // group
        group_index, axis = g.constant(_channel_groups(qz), "channel_groups"), -1
    else:                                      # per-channel groups: token t has group t // group
        tokens = g.op("Shape", packed, start=-2, end=-1)
        group_index, axis = _token_groups(g, qz, tokens), -2
    scale = g.op("Gather", scale, group_index, axis=axis)
    zero = g.op("Gather", zero, group_index, axis=axis)
    return g.op("Add", g.op("Mul", codes, scale), zero, hint="x_hat")


def unrotate(g: Graph, qz: ScalarQuant, y: str) -> str:
    """The identity (see `rotate`)."""
    return y

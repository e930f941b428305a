"""`latkv.PolarQuant` as standard ONNX ops (Han et al. 2025, arXiv 2502.02617, Sec. 3).

Encode: ``y = R x`` with the butterflies of `latkv.onnx.rotation` (bit-exact), then the
recursive polar transform of `latkv.polar.polar_angles` on the whole row (a row's blocks are
contiguous and of a power-of-two size, so level ``l`` pairs the squared radii ``2j`` and
``2j + 1`` of level ``l - 1`` globally): squared radii ``a a + b b`` and their pairwise sums in
float64, block radii their square roots, in the library's order, hence its values.

ONNX has no ``Atan2``, and an approximate angle would put a code on the wrong side of a
boundary now and then. The codes are therefore counted without computing any angle. The
library's code is ``#{k : beta_k < fl(angle)}`` with ``fl(angle)`` the float64 ``arctan2``
(plus ``2 pi`` at level 1 when negative). For a correctly rounded ``arctan2``,
``beta_k < fl(angle)`` holds exactly when the true angle lies beyond a threshold ``V_k``
worked out once per boundary in exact arithmetic (`_upper_threshold`, `_lower_threshold`):
the midpoint above ``beta_k``, or at level 1 for a negative angle the midpoint below the
smallest float64 ``t`` with ``fl(t + 2 pi) > beta_k``. And "the angle of ``(a, b)`` lies
beyond ``V``" is the sign of the cross product ``b cos V - a sin V``, evaluated from exact
products: ``cos V`` and ``sin V`` as sums of three 26-bit pieces (computed to 200 bits,
`_cos_sin`), the coordinates as float32 values (level 1) or Veltkamp halves of 26 bits
(levels >= 2), so that every product is exact in float64; added largest first, where near a
threshold the first two cancel exactly (Sterbenz) and the rest are ``2^-25`` smaller. The sign
is the true one unless the angle is within about ``2^-73`` rad of ``V_k``. A binary search
over the boundaries (one cross product per bit, one Gather of the pieces) gives the code;
zeros, signed zeros, infinities and NaN are first mapped to points of the same code
(`_canonical_pair`, `_canonical_radii`).

So the codes are those of a correctly rounded ``arctan2``. The library's codes come from the
C library's ``atan2`` (numba and NumPy call the same one); they can differ only for an angle
within one float64 rounding of a boundary that this ``atan2`` rounds the other way than
correct rounding would, where the library's own backends may differ as well (`latkv.polar`'s
caveat). With glibc, float32 pairs within 0.004 ulp of a threshold
(`tests/test_onnx_polar.py`) get the library's codes. No configuration is refused for it.
Radii past 65504 with ``radius_dtype="float16"``: the library raises, the graph writes inf.

Decode: the inverse transform of `latkv.polar.polar_blocks` from the stored radius: each
radius times the float64 cosine and sine of the centroids (NumPy's ``cos`` and ``sin``, as the
library tabulates them), level ``L`` down to 1, cast to float32 once: the library's rotated
estimate bit for bit. ``rotate`` and ``unrotate`` are the preconditioning rotation and its
inverse, so scores and weighted sums work in the rotated domain.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import numpy as np

from latkv.onnx.graph import (
    Graph,
    float16_from_float64,
    leading_shape,
    onnx_type,
    pack_bits,
    restore_rows,
    rows,
    unpack_bits,
)
from latkv.onnx.rotation import rotate as apply_rotation
from latkv.onnx.standard import refuse_channel_split
from latkv.polar import TWO_PI, PolarQuant, PolarStage

OPSET = 18

#: bits of the fixed-point cosines and sines of the thresholds
COS_SIN_PRECISION = 200
#: cos V and sin V as this many pieces ...
PIECES = 3
#: ... of at most this many significant bits: a piece times a float32 (24 bits) or a Veltkamp
#: half (26 bits) is exact in float64
PIECE_BITS = 26
#: Veltkamp's splitter 2^27 + 1: a float64 becomes two halves of at most 26 bits each
VELTKAMP_SPLITTER = float(2**27 + 1)
#: the direction whose cross product ``-b`` decides "never" (b >= 0) or "always" (b < 0)
FLAT_DIRECTION = ((-1.0,) + (0.0,) * (PIECES - 1), (0.0,) * PIECES)


def check(qz: PolarQuant) -> None:
    """Refuse ``local_stats`` (PolarQuant has no outlier channels); every depth, bit
    allocation, radius dtype and rotation has a graph."""
    refuse_channel_split(qz)


# -- the thresholds, once per codebook (exact arithmetic) -------------------------------------


def _cos_sin(value: Fraction) -> tuple[int, int]:
    """``cos(value)`` and ``sin(value)`` as fixed-point integers of `COS_SIN_PRECISION` bits
    (Taylor series; ``|value| <= 4``, error a few units in the last place)."""
    one = 1 << COS_SIN_PRECISION
    negative = value < 0
    x = (abs(value.numerator) << COS_SIN_PRECISION) // value.denominator
    cosine = sine = 0
    term, n = one, 0
    while term:
        if n % 4 == 0:
            cosine += term
        elif n % 4 == 1:
            sine += term
        elif n % 4 == 2:
            cosine -= term
        else:
            sine -= term
        n += 1
        term = term * x // (one * n)
    return cosine, -sine if negative else sine


def _pieces(fixed: int) -> tuple[float, ...]:
    """A fixed-point value as `PIECES` float64 pieces of at most `PIECE_BITS` significant bits,
    largest first (their sum is within about ``2^-77`` relative of it)."""
    pieces = []
    rest = fixed
    for _ in range(PIECES):
        shift = max(abs(rest).bit_length() - PIECE_BITS, 0)
        head = (rest + (1 << shift >> 1)) >> shift          # rounded to PIECE_BITS bits
        pieces.append(math.ldexp(float(head), shift - COS_SIN_PRECISION))
        rest -= head << shift
    return tuple(pieces)


def _direction(threshold: Fraction) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(cos V, sin V)`` as pieces."""
    cosine, sine = _cos_sin(threshold)
    return _pieces(cosine), _pieces(sine)


def _upper_threshold(boundary: float) -> Fraction:
    """The midpoint above ``boundary``: a correctly rounded angle is above ``boundary``
    exactly when the true angle is above the midpoint (never on it: the tangent of a nonzero
    rational is irrational, and a pair's is a ratio of floats)."""
    return (Fraction(boundary) + Fraction(float(np.nextafter(boundary, np.inf)))) / 2


def _lower_threshold(boundary: float) -> Fraction | None:
    """For a negative level-1 angle ``t`` (float64, in ``[-fl(pi), 0)``): the true angle above
    which ``fl(t + TWO_PI) > boundary`` (`latkv.polar.polar_angles` adds ``2 pi``), or
    ``None`` when every negative angle is."""
    t = np.float64(boundary) - np.float64(TWO_PI)
    while t + TWO_PI > boundary:                     # fl(t + 2 pi) is monotone in t
        t = np.nextafter(t, -np.inf)
    while not t + TWO_PI > boundary:
        t = np.nextafter(t, np.inf)
    if t <= -np.pi:
        return None
    return (Fraction(float(np.nextafter(t, -np.inf))) + Fraction(float(t))) / 2


@cache
def direction_table(level: int, boundaries: tuple[float, ...]) -> np.ndarray:
    """``(thresholds, 2 PIECES)`` float64: pieces of ``cos V_k`` then of ``-sin V_k``.

    Level ``>= 2``: ``V_k`` the midpoint above boundary ``k`` (angles in ``[0, pi/2]``).
    Level 1: rows ``0 .. m-1`` for angles in ``[0, pi]`` (midpoints above the boundaries, or
    "never" past ``fl(pi)``), rows ``m .. 2m-1`` for angles in ``(-pi, 0)`` (`_lower_threshold`,
    or "always").
    """
    directions = []
    for boundary in boundaries:
        directions.append(FLAT_DIRECTION if level == 1 and boundary >= np.pi
                          else _direction(_upper_threshold(boundary)))
    if level == 1:
        for boundary in boundaries:
            threshold = _lower_threshold(boundary)
            directions.append(FLAT_DIRECTION if threshold is None else _direction(threshold))
    return np.array([(*cosine, *(-s for s in sine)) for cosine, sine in directions],
                    dtype=np.float64)


# -- exact products ----------------------------------------------------------------------------


def _veltkamp(g: Graph, value: str) -> list[str]:
    """Veltkamp's split: ``value = high + low`` exactly, each of at most 26 bits."""
    scaled = g.op("Mul", value, g.constant(np.float64(VELTKAMP_SPLITTER)))
    high = g.op("Sub", scaled, g.op("Sub", scaled, value), hint="high")
    return [high, g.op("Sub", value, high, hint="low")]


# -- the codes --------------------------------------------------------------------------------


def _signbit(g: Graph, value: str) -> str:
    """``value < 0`` or ``value`` is ``-0.0`` (``1 / value < 0``); False for NaN."""
    zero = g.constant(np.float64(0))
    return g.op("Or", g.op("Less", value, zero),
                g.op("Less", g.op("Div", g.constant(np.float64(1)), value), zero))


def _unit_sign(g: Graph, value: str) -> str:
    """``copysign(1, value)`` (float64)."""
    return g.op("Where", _signbit(g, value), g.constant(np.float64(-1)),
                g.constant(np.float64(1)))


def _canonical_pair(g: Graph, a: str, b: str) -> tuple[str, str, str, str]:
    """A level-1 pair ``(a, b)`` as finite ``(a', b')`` with ``b'`` never a zero of either
    sign, whose code is that of ``arctan2(b, a)`` (`latkv.polar.polar_angles`).

    An infinite coordinate becomes ``+-1`` and a finite one beside it 0 (C99 ``atan2``); a
    zero ``b`` becomes ``+0`` and ``a`` its sign, ``+-1``, since ``atan2(+-0, a)`` is ``+-0``
    (code 0) or ``+-pi`` (``fl(2 pi) - fl(pi) = fl(pi)``: the code of ``pi``) by ``a``'s sign
    bit alone. Returns ``(a', b', lower, nan)``: ``lower`` where ``b' < 0`` (angles in
    ``(-pi, 0)``), ``nan`` where either is NaN (the code past every boundary, as
    ``searchsorted`` puts NaN).
    """
    zero = g.constant(np.float64(0))
    nan = g.op("Or", g.op("IsNaN", a), g.op("IsNaN", b))
    a_infinite, b_infinite = g.op("IsInf", a), g.op("IsInf", b)
    a_sign = _unit_sign(g, a)
    a = g.op("Where", a_infinite, a_sign, g.op("Where", b_infinite, zero, a))
    b = g.op("Where", b_infinite, _unit_sign(g, b), g.op("Where", a_infinite, zero, b))
    b_zero = g.op("Equal", b, zero)
    a = g.op("Where", b_zero, a_sign, a, hint="a")
    b = g.op("Where", b_zero, zero, b, hint="b")
    return a, b, g.op("Less", b, zero), nan


def _canonical_radii(g: Graph, first: str, second: str) -> tuple[str, str, str]:
    """Level >= 2 radii ``(r_1, r_2) >= 0`` as finite ``(r_1', r_2')`` of the same
    ``arctan2(r_2, r_1)`` code: two zeros become ``(1, 0)`` (angle +0), infinities ``1`` and a
    finite radius beside one 0. Returns them and where either is NaN."""
    zero, one = g.constant(np.float64(0)), g.constant(np.float64(1))
    first_infinite, second_infinite = g.op("IsInf", first), g.op("IsInf", second)
    both_zero = g.op("And", g.op("Equal", first, zero), g.op("Equal", second, zero))
    nan = g.op("Or", g.op("IsNaN", first), g.op("IsNaN", second))
    first = g.op("Where", first_infinite, one, g.op("Where", second_infinite, zero, first))
    second = g.op("Where", second_infinite, one, g.op("Where", first_infinite, zero, second))
    return g.op("Where", both_zero, one, first, hint="r1"), second, nan


def _beyond(g: Graph, table: str, index: str, factors: str, terms: int, nan: str) -> str:
    """Whether the angle of each pair is beyond threshold ``index`` of ``table``: the sign of
    ``b cos V - a sin V``, its ``terms`` exact products (the gathered pieces times
    ``factors``) added largest first, in order; or NaN."""
    products = g.op("Mul", g.op("Gather", table, index, axis=1), factors)
    cross = None
    for term in g.op("Split", products, axis=0, outputs=terms, num_outputs=terms, hint="term"):
        cross = term if cross is None else g.op("Add", cross, term)
    beyond = g.op("Greater", g.op("Squeeze", cross, g.constant(np.array([0], np.int64))),
                  g.constant(np.float64(0)))
    return g.op("Or", beyond, nan)


def _angle_codes(g: Graph, level: int, bits: int, boundaries: np.ndarray, a_parts: list[str],
                 b_parts: list[str], nan: str, lower: str | None) -> str:
    """``searchsorted(boundaries, angle, side="left")`` of each angle (uint8), by a binary
    search of ``bits`` steps over `_beyond` (`latkv.polar.polar_quantize_reference`).

    The products ``b_part cos_piece`` and ``-a_part sin_piece`` go largest first: near a
    threshold the first two cancel exactly (Sterbenz) and the rest are ``2^-25`` smaller, so
    adding them in order keeps the sign of the exact sum unless it is below about
    ``2^-74 |(a, b)|``.
    """
    directions = direction_table(level, tuple(float(b) for b in
                                              np.asarray(boundaries, np.float64)))
    columns, factors = [], []      # the terms on a new first axis: contiguous slices
    first = g.constant(np.array([0], np.int64))
    for piece in range(PIECES):
        for a, b in zip(a_parts, b_parts):
            columns += [directions[:, piece], directions[:, PIECES + piece]]
            factors += [g.op("Unsqueeze", b, first), g.op("Unsqueeze", a, first)]
    table = g.constant(np.ascontiguousarray(np.stack(columns)), "directions")
    factors = g.op("Concat", *factors, axis=0, hint="factors")
    offset = None
    if lower is not None:        # level 1: angles in (-pi, 0) use the table's second half
        offset = g.op("Where", lower, g.constant(np.int64(len(boundaries))),
                      g.constant(np.int64(0)))
    code = None
    for k in range(bits - 1, -1, -1):
        index = g.constant(np.full((1, 1), (1 << k) - 1, np.int64))   # broadcasts as (rows, n)
        for part in (offset, code):
            if part is not None:
                index = g.op("Add", index, part)
        taken = g.op("Cast", _beyond(g, table, index, factors, len(columns), nan),
                     to=onnx_type("int64"))
        if k:
            taken = g.op("Mul", taken, g.constant(np.int64(1 << k)))
        code = taken if code is None else g.op("Add", code, taken)
    return g.op("Cast", code, to=onnx_type("uint8"), hint="codes")


def _pairs(g: Graph, values: str, count: int) -> tuple[str, str]:
    """``values[:, 0::2], values[:, 1::2]`` of ``values : (rows, 2 count)``."""
    grouped = g.op("Reshape", values, g.constant(np.array([-1, count, 2], np.int64)))
    even, odd = g.op("Split", grouped, axis=2, outputs=2, num_outputs=2, hint="pair")
    shape = g.constant(np.array([-1, count], np.int64))
    return g.op("Reshape", even, shape), g.op("Reshape", odd, shape)


def polar_encode(g: Graph, stage: PolarStage, rotated: str) -> dict[str, str]:
    """The arrays of ``stage.encode`` from ``rotated : (..., dim)`` float32 (the rotated
    vectors): `latkv.polar.polar_quantize_reference` and the radius cast to its dtype."""
    lead = leading_shape(g, rotated)
    flat = g.op("Cast", rows(g, rotated, stage.dim), to=onnx_type("float64"))
    arrays: dict[str, str] = {}
    # level 1, Sec. 3.1: (y_2j, y_2j+1) -> theta = atan2(y_2j+1, y_2j) in [0, 2 pi)
    count = stage.dim // 2
    a, b = _pairs(g, flat, count)
    squared = g.op("Add", g.op("Mul", a, a), g.op("Mul", b, b), hint="squared")
    a, b, lower, nan = _canonical_pair(g, a, b)
    codes = _angle_codes(g, 1, stage.level_bits[0], stage.codebooks[0].boundaries, [a], [b],
                         nan, lower)
    arrays["level1"] = pack_bits(g, restore_rows(g, codes, lead, (count,)),
                                 stage.level_bits[0], count)
    # levels >= 2, Sec. 3.1: (s_2j, s_2j+1) -> psi = atan2(sqrt s_2j+1, sqrt s_2j) in [0, pi/2]
    for level in range(2, stage.levels + 1):
        count //= 2
        bits = stage.level_bits[level - 1]
        first, second = _pairs(g, squared, count)
        first_radius, second_radius, nan = _canonical_radii(
            g, g.op("Sqrt", first), g.op("Sqrt", second))
        codes = _angle_codes(g, level, bits, stage.codebooks[level - 1].boundaries,
                             _veltkamp(g, first_radius), _veltkamp(g, second_radius), nan, None)
        arrays[f"level{level}"] = pack_bits(g, restore_rows(g, codes, lead, (count,)), bits,
                                            count)
        squared = g.op("Add", first, second, hint="squared")
    # the block radius: the norm of 2^levels coordinates, stored as radius_dtype
    radius = restore_rows(g, g.op("Sqrt", squared, hint="radius"), lead, (count,))
    arrays["radius"] = (float16_from_float64(g, radius) if stage.radius_dtype == "float16"
                        else g.op("Cast", radius, to=onnx_type("float32")))
    return arrays


def encode(g: Graph, qz: PolarQuant, x: str) -> dict[str, str]:
    """``qz.encode``'s arrays of ``x : (..., dim)`` float32: ``level1 .. levelL`` and ``radius``."""
    stage = qz.stages()[0]
    return polar_encode(g, stage, apply_rotation(g, stage.rotation, x))    # y = R x, then polar


# -- decode -----------------------------------------------------------------------------------


def polar_estimate(g: Graph, stage: PolarStage, arrays: dict[str, str]) -> str:
    """The rotated-domain estimate ``(..., dim)`` float32 from the arrays: radius times the
    centroids' cosines and sines, level ``L`` down to 1 (`latkv.polar.polar_blocks`, as
    `latkv.polar.polar_dequantize_reference`)."""
    lead = leading_shape(g, arrays["radius"])
    blocks = stage.dim >> stage.levels
    radius = rows(g, g.op("Cast", arrays["radius"], to=onnx_type("float64")), blocks)
    last = g.axes(-1)
    for level in range(stage.levels, 0, -1):
        count = stage.dim >> level
        bits = stage.level_bits[level - 1]
        codes = rows(g, unpack_bits(g, arrays[f"level{level}"], bits, count), count)
        centroids = stage.codebooks[level - 1].centroids.astype(np.float64)
        cosine = g.op("Gather", g.constant(np.cos(centroids), "cosines"), codes, axis=0)
        sine = g.op("Gather", g.constant(np.sin(centroids), "sines"), codes, axis=0)
        # r -> (r cos psi, r sin psi) at positions 2j, 2j + 1
        pair = g.op("Concat", g.op("Unsqueeze", g.op("Mul", radius, cosine), last),
                    g.op("Unsqueeze", g.op("Mul", radius, sine), last), axis=-1)
        radius = g.op("Reshape", pair, g.constant(np.array([-1, 2 * count], np.int64)))
    return restore_rows(g, g.op("Cast", radius, to=onnx_type("float32")), lead, (stage.dim,))


def rotate(g: Graph, qz: PolarQuant, q: str) -> str:
    """The preconditioning rotation ``R q`` of a query ``(..., dim)``."""
    return apply_rotation(g, qz.stages()[0].rotation, q)


def rotated_decode(g: Graph, qz: PolarQuant, arrays: dict[str, str]) -> str:
    """The rotated-domain estimate ``(..., dim)`` float32 (`PolarStage.rotated_estimate`)."""
    return polar_estimate(g, qz.stages()[0], arrays)


def unrotate(g: Graph, qz: PolarQuant, y: str) -> str:
    """``R^T y``: the rotated domain back to the input's."""
    return apply_rotation(g, qz.stages()[0].rotation, y, inverse=True)

"""`latkv.E8Quant` at fixed rate as standard ONNX ops: bit-exact Voronoi codes of E8.

Encode (`latkv.e8.E8Stage._encode_fixed`): the randomized Hadamard rotation with the
butterflies of `latkv.onnx.rotation` (bit-exact), then per vector the scale ladder of
`latkv.e8.voronoi_encode_reference` and the labels ``λ G^-1 mod 2^b`` of the nearest E8
points (Conway and Sloane 1982 for ``nearest_e8``, 1983 for the Voronoi code), packed
LSB-first. The library's loops over rungs become extra axes:

- *coarse pass*: every rung ``0, 8, 16, ... < r - 1`` at once, ``(rows, rungs, groups, 8)``;
  the first that fits is an ArgMax over the fit mask with a True column appended for the
  default rung ``r - 1``;
- *fine pass*: the 7 rungs below each vector's coarse rung at once (a per-vector gather of the
  multipliers), the first valid fitting one again by ArgMax, the coarse rung the default.

Every float operation is the library's, in its order: float32 division by the scale,
half-to-even Round, the parity fix at the first largest rounding error (ArgMax keeps the first
index), squared distances summed in float64 coordinate by coordinate (no ReduceSum, whose
order is the runtime's), D8 winning ties. One thing is not a plain Cast: the candidate scale
``fp16(base * multiplier)`` rounds float64 to float16 *once*, while onnxruntime's Cast
double -> float16 goes through float32 (double rounding, wrong in about 1 of 20 000 values);
the graph rounds at the float16 ulp explicitly (`float16_round`).

Decode works in the rotated domain: ``rotated_decode = scale * (y - q nearest_e8((y - a) /
q))`` with ``y = k G`` (`latkv.e8.voronoi_decode_reference`), exactly the library's estimate;
``scores`` multiply it by the rotated query, ``decode`` rotates it back.

The rANS form (``entropy=True``) is refused: its streams are sequential and variable-length.
Inputs the library refuses with an error (NaN, or rotated values too large for a float16
scale at ``bits``) cannot raise inside a graph: they give meaningless codes (an ``inf`` scale).
"""

from __future__ import annotations

import numpy as np

from latkv.e8 import (
    GENERATOR,
    GENERATOR_INVERSE,
    SMALLEST_SCALE,
    TIE_OFFSET,
    E8Quant,
    E8Stage,
    scale_ladder,
)
from latkv.onnx.graph import (
    Graph,
    float16_from_float64,
    last_axis_sum,
    leading_shape,
    onnx_type,
    pack_bits,
    restore_rows,
    rows,
    unpack_bits,
)
from latkv.onnx.rotation import rotate as apply_rotation
from latkv.onnx.standard import refuse_channel_split

OPSET = 18

#: the number of rungs the fine pass tries below the coarse rung (`voronoi_encode_reference`)
FINE_RUNGS = 7
#: the coarse pass's stride over the ladder
COARSE_STRIDE = 8


def check(qz: E8Quant) -> None:
    """Refuse the rANS form and the channel statistics (no standard-op graph for either)."""
    if qz.entropy:
        raise ValueError(f"{qz.spec}: entropy-coded E8 streams (rANS) are sequential and "
                         "data-dependent in length; export with flavour='custom'")
    refuse_channel_split(qz)


# -- small helpers ----------------------------------------------------------------------------



def _reduce_max(g: Graph, x: str, *axes: int, keepdims: int = 0) -> str:
    return g.op("ReduceMax", x, g.axes(*axes), keepdims=keepdims)


def _first_true(g: Graph, mask: str) -> str:
    """Index of the first True along the last axis of ``mask : (rows, k)`` bool, or ``k``
    when none is: ``(rows, 1)`` int64 (ArgMax returns the first of equal maxima)."""
    flags = g.op("Cast", mask, to=onnx_type("int32"))
    flags = g.op("Pad", flags, g.constant(np.array([0, 0, 0, 1], np.int64)),
                 g.constant(np.int32(1)))
    return g.op("ArgMax", flags, axis=-1, keepdims=1, select_last_index=0, hint="first")


# -- the lattices (latkv.lattice) -------------------------------------------------------------


def nearest_d8(g: Graph, x: str) -> str:
    """`latkv.lattice.nearest_d8_reference` of ``x : (..., 8)`` float32.

    Round half to even; if the sum is odd, move the coordinate of largest rounding error (the
    first among equals) one step towards ``x`` (upwards for an exact integer).
    """
    rounded = g.op("Round", x)
    error = g.op("Sub", x, rounded)                                   # exact in float32
    total = last_axis_sum(g, g.op("Cast", rounded, to=onnx_type("int64")), keepdims=1)
    odd = g.op("Equal", g.op("BitwiseAnd", total, g.constant(np.int64(1))),
               g.constant(np.int64(1)))
    worst = g.op("ArgMax", g.op("Abs", error), axis=-1, keepdims=1, select_last_index=0)
    worst_error = g.op("GatherElements", error, worst, axis=-1)
    step = g.op("Where", g.op("GreaterOrEqual", worst_error, g.constant(np.float32(0))),
                g.constant(np.float32(1)), g.constant(np.float32(-1)))
    fix = g.op("And", g.op("Equal", g.constant(np.arange(8, dtype=np.int64)), worst), odd)
    return g.op("Where", fix, g.op("Add", rounded, step), rounded, hint="d8")


def squared_distance(g: Graph, x: str, y: str) -> str:
    """`latkv.lattice.squared_distance`: ``sum_i (x_i - y_i)^2`` in float64, in coordinate
    order 0..7 (explicit adds; a ReduceSum's order is the runtime's), ``(..., 1)``."""
    difference = g.op("Cast", g.op("Sub", x, y), to=onnx_type("float64"))
    columns = g.op("Split", difference, axis=-1, outputs=8, num_outputs=8, hint="coordinate")
    total = g.op("Mul", columns[0], columns[0])
    for column in columns[1:]:
        total = g.op("Add", total, g.op("Mul", column, column))
    return total


def nearest_e8(g: Graph, x: str) -> str:
    """`latkv.lattice.nearest_e8_reference` of ``x : (..., 8)`` float32: the nearer of the
    nearest D8 point and the nearest point of D8 + 1/2 (D8 on a tie)."""
    half = g.constant(np.float32(0.5))
    integer = nearest_d8(g, x)
    coset = g.op("Add", nearest_d8(g, g.op("Sub", x, half)), half)
    keep_integer = g.op("LessOrEqual", squared_distance(g, x, integer),
                        squared_distance(g, x, coset))
    return g.op("Where", keep_integer, integer, coset, hint="e8")


def voronoi_shift(g: Graph, points: str, bits: int) -> str:
    """``nearest_e8((points - a) / q)``: zero exactly for the points of the Voronoi code
    (`latkv.e8.in_voronoi_code`, `latkv.e8.voronoi_points`)."""
    offset = g.op("Sub", points, g.constant(np.asarray(TIE_OFFSET, np.float32), "tie_offset"))
    return nearest_e8(g, g.op("Div", offset, g.constant(np.float32(1 << bits))))


def voronoi_labels(g: Graph, points: str, bits: int) -> str:
    """`latkv.e8.voronoi_labels`: ``rint(λ G^-1) mod 2^bits`` as uint8 (``G^-1`` holds halves,
    so the float64 products and sums are exact in any order)."""
    k = g.op("MatMul", g.op("Cast", points, to=onnx_type("float64")),
             g.constant(np.ascontiguousarray(GENERATOR_INVERSE), "generator_inverse"))
    k = g.op("Cast", g.op("Round", k), to=onnx_type("int64"))
    k = g.op("BitwiseAnd", k, g.constant(np.int64((1 << bits) - 1)))   # mod 2^bits
    return g.op("Cast", k, to=onnx_type("uint8"), hint="labels")


def voronoi_points(g: Graph, labels: str, bits: int) -> str:
    """`latkv.e8.voronoi_points` of int64 ``labels : (..., 8)``: ``y - q shift`` with
    ``y = float32(k G)`` (exact) and ``shift`` of `voronoi_shift`."""
    y = g.op("MatMul", g.op("Cast", labels, to=onnx_type("float64")),
             g.constant(np.ascontiguousarray(GENERATOR), "generator"))
    y = g.op("Cast", y, to=onnx_type("float32"))
    shift = voronoi_shift(g, y, bits)
    return g.op("Sub", y, g.op("Mul", g.constant(np.float32(1 << bits)), shift), hint="points")


# -- the scale ladder (latkv.e8.scale_ladder, scale_candidate) --------------------------------


def float16_round(g: Graph, value: str) -> str:
    """``float32(float16(value))`` of a float64 ``value``, rounded once as NumPy does
    (`latkv.onnx.graph.float16_from_float64`; onnxruntime's Cast would round twice)."""
    return g.op("Cast", float16_from_float64(g, value), to=onnx_type("float32"),
                hint="float16_value")


def scale_candidate(g: Graph, base: str, multiplier: str) -> str:
    """`latkv.e8.scale_candidate`: ``max(fp16(base * multiplier), 2^-24)`` float32, the
    product in float64 (``base : (rows, 1)``, ``multiplier : (rows, k)`` or ``(k,)``)."""
    return g.op("Max", float16_round(g, g.op("Mul", base, multiplier)),
                g.constant(np.float32(SMALLEST_SCALE)), hint="scale")


def fits(g: Graph, groups: str, scale: str, bits: int) -> str:
    """Whether every group of each vector snaps into the Voronoi code at each scale.

    ``groups : (rows, 1, dim / 8, 8)`` float32, ``scale : (rows, k)`` float32 -> ``(rows,
    k)`` bool: ``nearest_e8(groups / s)`` in ``C_bits`` for all groups (the ``fits`` of
    `latkv.e8.voronoi_encode_reference`).
    """
    points = nearest_e8(g, g.op("Div", groups, g.op("Unsqueeze", scale, g.axes(2, 3))))
    shift = voronoi_shift(g, points, bits)
    return g.op("Equal", _reduce_max(g, g.op("Abs", shift), -2, -1),
                g.constant(np.float32(0)), hint="fits")


def choose_rungs(g: Graph, groups: str, base: str, multipliers: np.ndarray,
                 bits: int) -> str:
    """The rung `latkv.e8.voronoi_encode_reference` picks for each vector, ``(rows, 1)``
    int64: its coarse then fine pass, each pass's rungs tried at once."""
    last = multipliers.shape[0] - 1
    table = g.constant(multipliers.astype(np.float64), "multipliers")
    # coarse pass: rungs 0, 8, 16, ... below the last; the last when none fits
    coarse_rungs = np.arange(0, last, COARSE_STRIDE, dtype=np.int64)
    coarse_fits = fits(g, groups, scale_candidate(g, base, g.constant(
        multipliers[coarse_rungs].astype(np.float64), "coarse_multipliers")), bits)
    coarse = g.op("Gather", g.constant(np.append(coarse_rungs, last), "coarse_rungs"),
                  _first_true(g, coarse_fits), axis=0, hint="coarse")
    # fine pass: rungs coarse - 7 .. coarse - 1, lowest first, those >= 0; else the coarse rung
    fine_rungs = g.op("Add", coarse, g.constant(np.arange(-FINE_RUNGS, 0, dtype=np.int64)))
    valid = g.op("GreaterOrEqual", fine_rungs, g.constant(np.int64(0)))
    clipped = g.op("Max", fine_rungs, g.constant(np.int64(0)))
    fine_fits = fits(g, groups, scale_candidate(g, base, g.op("Gather", table, clipped,
                                                              axis=0)), bits)
    first = _first_true(g, g.op("And", valid, fine_fits))
    candidates = g.op("Concat", fine_rungs, coarse, axis=-1)
    return g.op("GatherElements", candidates, first, axis=-1, hint="rung")


# -- the module interface (latkv.onnx.standard) -----------------------------------------------


def _stage(qz: E8Quant) -> E8Stage:
    return qz.stages()[0]


def encode(g: Graph, qz: E8Quant, x: str) -> dict[str, str]:
    """`latkv.e8.E8Stage._encode_fixed` of ``x : (..., dim)`` float32: ``labels`` (packed)
    and ``scale`` (float16), bit-identical to ``qz.encode(x)``."""
    stage = _stage(qz)
    bits, dim = int(stage.bits), stage.dim
    rotated = rotate(g, qz, x)
    lead = leading_shape(g, rotated)
    flat = rows(g, rotated, dim)
    _, multipliers = scale_ladder(bits)
    # base = float64(max_i |x_i|) / 2^bits
    base = g.op("Div", g.op("Cast", _reduce_max(g, g.op("Abs", flat), -1, keepdims=1),
                            to=onnx_type("float64")), g.constant(np.float64(1 << bits)))
    ladder_groups = g.op("Reshape", flat, g.constant(np.array([-1, 1, dim // 8, 8], np.int64)))
    rung = choose_rungs(g, ladder_groups, base, multipliers, bits)
    scale = scale_candidate(g, base, g.op("Gather", g.constant(multipliers, "multipliers"),
                                          rung, axis=0))            # (rows, 1)
    groups = g.op("Reshape", flat, g.constant(np.array([-1, dim // 8, 8], np.int64)))
    points = nearest_e8(g, g.op("Div", groups, g.op("Unsqueeze", scale, g.axes(2))))
    labels = g.op("Reshape", voronoi_labels(g, points, bits),
                  g.constant(np.array([-1, dim], np.int64)))
    packed = restore_rows(g, pack_bits(g, labels, bits, dim), lead,
                          ((dim * bits + 7) // 8,))
    scale16 = g.op("Reshape", g.op("Cast", scale, to=onnx_type("float16")), lead)
    return {"labels": packed, "scale": scale16}


def rotate(g: Graph, qz: E8Quant, q: str) -> str:
    """The stage's randomized Hadamard rotation (the identity with ``rotation="none"``)."""
    rotation = _stage(qz).rotation
    return q if rotation is None else apply_rotation(g, rotation, q)


def rotated_decode(g: Graph, qz: E8Quant, arrays: dict[str, str]) -> str:
    """`latkv.e8.E8Stage._fixed_estimate`: the code points times their scale, ``(..., dim)``
    float32 in the rotated domain (the library's float32 operations, so the same values)."""
    stage = _stage(qz)
    bits, dim = int(stage.bits), stage.dim
    packed = arrays["labels"]
    lead = leading_shape(g, packed)
    labels = g.op("Reshape", unpack_bits(g, packed, bits, dim),
                  g.constant(np.array([-1, 8], np.int64)))
    points = g.op("Reshape", voronoi_points(g, labels, bits),
                  g.constant(np.array([-1, dim], np.int64)))
    scale = g.op("Reshape", g.op("Cast", arrays["scale"], to=onnx_type("float32")),
                 g.constant(np.array([-1, 1], np.int64)))
    return restore_rows(g, g.op("Mul", points, scale), lead, (dim,))


def unrotate(g: Graph, qz: E8Quant, y: str) -> str:
    """The inverse rotation of ``y : (..., dim)``."""
    rotation = _stage(qz).rotation
    return y if rotation is None else apply_rotation(g, rotation, y, inverse=True)

"""The rotations of `latkv.rotations` as standard ONNX ops, bit-exact with the library.

A MatMul by the rotation matrix would sum in a different order than the fast Walsh-Hadamard
transform (and differently per execution provider), which changes the last bit of some rotated
coordinates and so, rarely, a code. The graph therefore repeats the library's butterflies: for
``h = 1, 2, 4, ...`` the pairs ``(i, i + h)`` inside blocks of ``2h`` become ``(a + b, a - b)``
(Reshape, Split, Add, Sub, Concat), then the one ``1/sqrt(size)`` multiply, exactly as
`latkv.rotations.hadamard_segment_reference`. `RandomOrthogonal` is a dense MatMul in the
library too, so its graph is one (its codes are exact only where the BLAS sums alike).
"""

from __future__ import annotations

import numpy as np

from latkv.onnx.graph import Graph, leading_shape, restore_rows, rows
from latkv.rotations import RandomizedHadamard, RandomOrthogonal, Rotation


def fwht(g: Graph, x: str, size: int) -> str:
    """Unnormalised Walsh-Hadamard transform of ``x : (rows, size)`` (Sylvester order)."""
    h = 1
    while h < size:
        blocks = g.op("Reshape", x, g.constant(np.array([-1, size // (2 * h), 2, h], np.int64)))
        a, b = g.op("Split", blocks, axis=2, outputs=2, num_outputs=2, hint="half")
        x = g.op("Concat", g.op("Add", a, b), g.op("Sub", a, b), axis=2)
        x = g.op("Reshape", x, g.constant(np.array([-1, size], np.int64)))
        h *= 2
    return x


def _hadamard_segment(g: Graph, y: str, dim: int, start: int, size: int, signs: np.ndarray,
                      inverse: bool) -> str:
    """One orthonormal stage on ``y[:, start:start+size]`` of ``y : (rows, dim)`` float32."""
    pieces = g.op("Split", y, g.constant(np.array([start, size, dim - start - size], np.int64)),
                  axis=1, outputs=3) if size != dim else [None, y, None]
    segment = pieces[1]
    scale = g.constant(np.float32(1.0 / np.sqrt(size)))
    sign_values = g.constant(np.asarray(signs, np.float32), "signs")
    if inverse:   # signs * H seg / sqrt(size): (fwht * scale) * signs
        segment = g.op("Mul", g.op("Mul", fwht(g, segment, size), scale), sign_values)
    else:         # H (signs * seg) / sqrt(size)
        segment = g.op("Mul", fwht(g, g.op("Mul", segment, sign_values), size), scale)
    if size == dim:
        return segment
    parts = [p for p, width in ((pieces[0], start), (segment, size),
                                (pieces[2], dim - start - size)) if width]
    return g.op("Concat", *parts, axis=1) if len(parts) > 1 else parts[0]


def rotate(g: Graph, rotation: Rotation, x: str, inverse: bool = False) -> str:
    """``rotation.apply(x)`` (or ``inverse``) of ``x : (..., dim)`` float32."""
    dim = rotation.dim
    if isinstance(rotation, RandomOrthogonal):
        matrix = rotation.orthogonal if inverse else rotation.orthogonal.T
        return g.op("MatMul", x, g.constant(np.ascontiguousarray(matrix), "orthogonal"))
    if not isinstance(rotation, RandomizedHadamard):
        raise TypeError(f"no ONNX graph for the rotation {type(rotation).__name__}")
    lead = leading_shape(g, x)
    y = rows(g, x, dim)
    p = rotation.block
    if rotation.tail_signs is None:
        y = _hadamard_segment(g, y, dim, 0, p, rotation.head_signs, inverse)
    elif not inverse:
        y = g.op("Gather", y, g.constant(rotation.permutation.astype(np.int64), "permutation"),
                 axis=1)
        y = _hadamard_segment(g, y, dim, 0, p, rotation.head_signs, False)
        y = _hadamard_segment(g, y, dim, dim - p, p, rotation.tail_signs, False)
    else:
        y = _hadamard_segment(g, y, dim, dim - p, p, rotation.tail_signs, True)
        y = _hadamard_segment(g, y, dim, 0, p, rotation.head_signs, True)
        # out[..., permutation] = y  is  out = y[..., argsort(permutation)]
        y = g.op("Gather", y, g.constant(np.argsort(rotation.permutation).astype(np.int64),
                                         "unpermutation"), axis=1)
    return restore_rows(g, y, lead, (dim,))

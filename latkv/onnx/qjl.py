"""`latkv.QJL` as standard ONNX ops: sign bits of a Gaussian sketch and the norm.

Encode (QJL Definition 1): ``signs = pack(S y >= 0)`` with the projection in float64, as the
library computes it, and the norm summed in float64. The scores domain is the sketch's:
``rotate(q) = S q``, ``rotated_decode = sqrt(pi/2)/m ||k|| z`` and ``unrotate(y) = y S``, so
``scores = <S q, sqrt(pi/2)/m ||k|| z>`` (Lemma 3) and a weighted sum applies ``S`` once per
query.
"""

from __future__ import annotations

import numpy as np

from latkv.onnx.graph import (
    Graph,
    float16_from_float64,
    onnx_type,
    pack_bits,
    unpack_bits,
    vector_norms,
)
from latkv.onnx.standard import refuse_channel_split
from latkv.qjl import QJL, QJL_SCALE

OPSET = 18


def check(qz: QJL) -> None:
    refuse_channel_split(qz)


def sign_bits(g: Graph, y: str, sketch: np.ndarray) -> str:
    """Packed ``sign(y S^T)`` of ``y : (..., d)`` float32 (float64 projection; bit set at >= 0)."""
    projection = g.op("MatMul", g.op("Cast", y, to=onnx_type("float64")),
                      g.constant(np.ascontiguousarray(sketch.T), "sketch_t"))
    nonnegative = g.op("GreaterOrEqual", projection, g.constant(np.float64(0)))
    return pack_bits(g, g.op("Cast", nonnegative, to=onnx_type("uint8")), 1, sketch.shape[0])


def signs(g: Graph, packed: str, rows: int) -> str:
    """``(..., ceil(m/8))`` uint8 -> ``(..., m)`` float32 of ``+-1``."""
    bits = g.op("Cast", unpack_bits(g, packed, 1, rows), to=onnx_type("float32"))
    return g.op("Sub", g.op("Mul", bits, g.constant(np.float32(2))), g.constant(np.float32(1)))


def scaled(g: Graph, values: str, factor: str, constant: float) -> str:
    """``values * (constant * factor)[..., None]`` with ``factor : (...)`` of any float type."""
    coefficient = g.op("Mul", g.op("Cast", factor, to=onnx_type("float32")),
                       g.constant(np.float32(constant)))
    return g.op("Mul", values, g.op("Unsqueeze", coefficient,
                                    g.axes(-1)))


def encode(g: Graph, qz: QJL, x: str) -> dict[str, str]:
    stage = qz.stages()[0]
    norm = vector_norms(g, x)
    stored = (float16_from_float64(g, norm) if stage.norm_dtype == "float16"
              else g.op("Cast", norm, to=onnx_type("float32")))
    return {"signs": sign_bits(g, x, stage.sketch), "norm": stored}


def rotate(g: Graph, qz: QJL, q: str) -> str:
    sketch = qz.stages()[0].sketch
    return g.op("MatMul", q, g.constant(np.ascontiguousarray(sketch.T, np.float32), "sketch_t"))


def rotated_decode(g: Graph, qz: QJL, arrays: dict[str, str]) -> str:
    rows = qz.stages()[0].rows
    return scaled(g, signs(g, arrays["signs"], rows), arrays["norm"], QJL_SCALE / rows)


def unrotate(g: Graph, qz: QJL, y: str) -> str:
    sketch = qz.stages()[0].sketch
    return g.op("MatMul", y, g.constant(np.ascontiguousarray(sketch, np.float32), "sketch"))

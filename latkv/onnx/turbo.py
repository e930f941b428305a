"""`latkv.TurboQuant` as standard ONNX ops (Zandieh et al. 2025, Algorithms 1 and 2).

Encode: ``u = R x / ||x||`` with the butterflies of `latkv.onnx.rotation` (bit-exact), the
norm summed in float64 and divided in float32, a code per coordinate = the number of codebook
boundaries strictly below ``u_j``, packed LSB-first; EDEN factors and the prod stage's QJL signs
and residual norm in float64 as the library does. Scores and weighted sums work in the rotated
domain: ``rotated_decode = ||x|| (u_hat + sqrt(pi/2)/d gamma S^T z)``.
"""

from __future__ import annotations

import numpy as np

from latkv.onnx.graph import (
    Graph,
    count_below,
    float16_from_float64,
    gather_rows,
    last_axis_sum,
    onnx_type,
    pack_bits,
    safe_divisor,
    unpack_bits,
    vector_norms,
)
from latkv.onnx.qjl import scaled, sign_bits, signs
from latkv.onnx.rotation import rotate as apply_rotation
from latkv.onnx.standard import refuse_channel_split
from latkv.qjl import QJL_SCALE
from latkv.turbo import TurboQuant

OPSET = 18


def check(qz: TurboQuant) -> None:
    refuse_channel_split(qz)


def encode(g: Graph, qz: TurboQuant, x: str) -> dict[str, str]:
    stage = qz.stages()[0]
    rotated = apply_rotation(g, stage.rotation, x)
    norm = vector_norms(g, x)                                       # float64
    u = g.op("Div", rotated, g.op("Unsqueeze", safe_divisor(g, norm),
                                  g.axes(-1)), hint="u")
    arrays: dict[str, str] = {}
    u_hat = None
    if stage.mse_bits:                                              # Algorithm 1, lines 5-6
        codes = count_below(g, u, stage.codebook.boundaries)
        arrays["packed"] = pack_bits(g, codes, stage.mse_bits, stage.dim)
        u_hat = gather_rows(g, stage.codebook.centroids, g.op("Cast", codes,
                                                              to=onnx_type("int64")),
                            "centroids")
    factor = norm
    if qz.scale != "none":                                          # EDEN's stored factor
        u64 = g.op("Cast", u, to=onnx_type("float64"))
        u_hat64 = g.op("Cast", u_hat, to=onnx_type("float64"))
        dot = last_axis_sum(g, g.op("Mul", u64, u_hat64))
        if qz.scale == "eden":
            numerator, denominator = last_axis_sum(g, g.op("Mul", u64, u64)), dot
        else:
            numerator, denominator = dot, last_axis_sum(g, g.op("Mul", u_hat64, u_hat64))
        positive = g.op("Greater", denominator, g.constant(np.float64(0)))
        denominator = g.op("Where", positive, denominator, g.constant(np.float64(1)))
        factor = g.op("Div", g.op("Mul", norm, numerator), denominator)
    arrays["norm"] = float16_from_float64(g, factor)
    if qz.mode == "prod":                                           # Algorithm 2, line 6
        residual = u if u_hat is None else g.op("Sub", u, u_hat)
        arrays["signs"] = sign_bits(g, residual, stage.sketch)
        arrays["residual_norm"] = float16_from_float64(g, vector_norms(g, residual))
    return arrays


def rotate(g: Graph, qz: TurboQuant, q: str) -> str:
    return apply_rotation(g, qz.stages()[0].rotation, q)


def rotated_decode(g: Graph, qz: TurboQuant, arrays: dict[str, str]) -> str:
    stage = qz.stages()[0]
    estimate = None
    if stage.mse_bits:
        estimate = gather_rows(g, stage.codebook.centroids,
                               unpack_bits(g, arrays["packed"], stage.mse_bits, stage.dim),
                               "centroids")
    if qz.mode == "prod":
        sketch = g.constant(np.ascontiguousarray(stage.sketch, np.float32), "sketch")
        term = scaled(g, g.op("MatMul", signs(g, arrays["signs"], stage.dim), sketch),
                      arrays["residual_norm"], QJL_SCALE / stage.dim)
        estimate = term if estimate is None else g.op("Add", estimate, term)
    return scaled(g, estimate, arrays["norm"], 1.0)


def unrotate(g: Graph, qz: TurboQuant, y: str) -> str:
    return apply_rotation(g, qz.stages()[0].rotation, y, inverse=True)

"""The frozen per-channel pre-transform of `latkv.channel_transform` as standard ONNX ops.

Per head (every leading index of ``(..., tokens, dim)``), from the first ``stats_tokens``
tokens: ``mean`` = the per-channel mean and ``scale`` = the per-channel root mean square after
centring, both in float64 and rounded once to the stored float16 (a constant channel keeps
scale 1); the quantizer then encodes ``y = (x - mean) / scale`` (float32). Scores and value
sums need one transform per query: ``<q, x_hat> = <q * scale, y_hat> + <q, mean>`` and
``sum_n w_n x_hat_n = (sum_n w_n y_hat_n) * scale + (sum_n w_n) mean``.

The statistics are float64 reductions whose summation order is the runtime's; a different
order moves a float64 mean by an ulp, which changes its float16 rounding only on an exact tie
(about 2^-40 of values): the codes are the library's on every input the tests draw.
``local_stats`` (statistics per block of tokens) has no graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv.onnx.graph import Graph, float16_from_float64, onnx_type


def fit_and_apply(g: Graph, qz: Any, x: str) -> tuple[dict[str, str], str]:
    """``(statistics arrays, y)`` for ``x : (..., tokens, dim)`` float32 (`ChannelTransform.fit`
    then ``apply``)."""
    transform = getattr(qz, "channel_transform", None)   # ScalarQuant has none
    if transform is None or not transform.active:
        return {}, x
    prefill = g.op("Slice", x, g.constant(np.array([0], np.int64)),
                   g.constant(np.array([transform.stats_tokens], np.int64)), g.axes(-2))
    prefill = g.op("Cast", prefill, to=onnx_type("float64"))
    stats: dict[str, str] = {}
    mean64 = None
    y = x
    if transform.center:                                       # nanmean over the prefill
        stats["channel_mean"] = float16_from_float64(
            g, g.op("ReduceMean", prefill, g.axes(-2), keepdims=0))
        mean64 = g.op("Cast", stats["channel_mean"], to=onnx_type("float64"))
    if transform.channel_scale:                                # rms after centring
        centred = prefill if mean64 is None else g.op(
            "Sub", prefill, g.op("Unsqueeze", mean64, g.axes(-2)))
        rms = g.op("Sqrt", g.op("ReduceMean", g.op("Mul", centred, centred), g.axes(-2),
                                keepdims=0))
        scale = float16_from_float64(g, rms)
        positive = g.op("Greater", scale, g.constant(np.float16(0)))
        stats["channel_scale"] = g.op("Where", positive, scale, g.constant(np.float16(1)))
    mean, scale = expanded(g, stats)
    if mean is not None:                                       # y = (x - mean) / scale
        y = g.op("Sub", y, mean)
    if scale is not None:
        y = g.op("Div", y, scale)
    return stats, y


def expanded(g: Graph, stats: dict[str, str]) -> tuple[str | None, str | None]:
    """float32 ``(mean, scale)`` as ``(..., 1, dim)``, or None where absent."""
    def per_token(name: str) -> str | None:
        if name not in stats:
            return None
        return g.op("Unsqueeze", g.op("Cast", stats[name], to=onnx_type("float32")),
                    g.axes(-2))

    return per_token("channel_mean"), per_token("channel_scale")


def transformed_query(g: Graph, q: str, stats: dict[str, str]) -> str:
    """``q * scale`` for ``q : (..., m, dim)``."""
    _, scale = expanded(g, stats)
    return q if scale is None else g.op("Mul", q, scale)


def query_offset(g: Graph, q: str, stats: dict[str, str]) -> str | None:
    """``<q, mean>`` as ``(..., m, 1)``, or None without centring."""
    if "channel_mean" not in stats:
        return None
    mean = g.op("Cast", stats["channel_mean"], to=onnx_type("float32"))
    return g.op("MatMul", q, g.op("Unsqueeze", mean, g.axes(-1)))


def invert(g: Graph, y: str, stats: dict[str, str], weight_sums: str | None = None) -> str:
    """``y * scale + mean`` (``+ (sum w) mean`` for a value sum with ``weight_sums``)."""
    mean, scale = expanded(g, stats)
    if scale is not None:
        y = g.op("Mul", y, scale)
    if mean is not None:
        y = g.op("Add", y, mean if weight_sums is None else g.op("Mul", weight_sums, mean))
    return y

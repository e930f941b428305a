"""Which quantizers have standard-flavour graphs, and the one interface their modules follow.

Each module (`latkv.onnx.turbo`, `latkv.onnx.qjl`, ...) offers, for its quantizer ``qz``:

- ``OPSET``: the lowest opset its graphs need;
- ``check(qz)``: raise ``ValueError`` for a configuration standard ops cannot express;
- ``encode(g, qz, x) -> {array name: value}``: ``x : (..., dim)`` float32 (after the channel
  pre-transform, if any) to the stage's arrays of ``qz.code_layout`` with the same dtypes,
  shapes and bits as ``qz.encode``;
- ``rotate(g, qz, q)``: a query ``(..., dim)`` into the domain the codes are estimated in;
- ``rotated_decode(g, qz, arrays)``: the codes' estimate ``(..., k)`` float32 in that domain;
- ``unrotate(g, qz, y)``: ``(..., k)`` back to ``(..., dim)``.

So ``decode = unrotate(rotated_decode)``, ``scores = rotate(q) @ rotated_decode^T`` and a
weighted sum is ``unrotate(w @ rotated_decode)``: one rotation per query, none per key.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def refuse_channel_split(qz: Any) -> None:
    """Refuse outlier channels and per-block statistics (no standard graph); the frozen
    ``center`` / ``channel_scale`` transform has one (`latkv.onnx.channel_transform`)."""
    if qz.outlier_count or (qz.channel_transform.active and qz.local_stats):
        raise ValueError(
            f"{qz.spec}: outlier channels and local_stats have no standard-flavour graph; "
            "export with flavour='custom', which runs latkv itself")


def standard_module(qz: Any) -> ModuleType:
    """The graph module of ``qz``'s method; ``ValueError`` if it has none."""
    from latkv.onnx import e8, polar, qjl, scalar, turbo

    modules = {"turbo": turbo, "qjl": qjl, "scalar": scalar, "polar": polar, "e8": e8}
    module = modules.get(qz.name)
    if module is None:
        raise ValueError(f"{qz.name} has no standard-flavour ONNX graph (its encode is not "
                         "expressible in standard ops); export it with flavour='custom'")
    module.check(qz)
    return module

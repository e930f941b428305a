"""ONNX export of latkv's encode, decode, scores and attention (see docs/onnx.md).

`export` writes a model of standard ONNX ops (any execution provider) or of one custom node
per step (``ai.onnx.contrib`` domain, run by latkv through onnxruntime-extensions);
`session` checks a model's latkv metadata and returns a ready onnxruntime session.
Needs the ``onnx`` extra: ``pip install latkv[onnx]``.
"""

from latkv.onnx.model import FORMAT_VERSION, export
from latkv.onnx.runtime import session

__all__ = ["FORMAT_VERSION", "export", "session"]

"""The custom flavour: one node per encode / decode / scores / attention that runs latkv itself.

The nodes live in onnxruntime-extensions' ``ai.onnx.contrib`` domain, the one domain its Python
custom ops register in (a node in a ``latkv`` domain is "not a registered function/op" there).
Their op types say the step and how many code arrays go in or out, because onnxruntime lets
overloads of one op type differ in element types but not in their number of inputs and outputs:
``LatkvEncode2`` writes two arrays (TurboQuant-mse's ``packed`` and ``norm``), ``LatkvEncode4``
four (TurboQuant-prod), ``LatkvCompressedAttention2x3`` reads two key arrays and three value
arrays. Attributes: ``spec`` (the quantizer's canonical spec string, i.e. every parameter),
``latkv_format`` (`FORMAT_VERSION`), and for attention ``value_spec`` and ``scale``.

Every method and configuration has a custom graph, entropy-coded E8 included, except QET
(its arrays change with the token count, which a graph with dynamic axes cannot follow); the
ops run latkv's NumPy reference (`BACKEND`) inside onnxruntime, on the CPU, whatever the
execution provider.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from latkv.container import Codes
from latkv.onnx.graph import Graph, onnx_type
from latkv.quantizer import Quantizer

DOMAIN = "ai.onnx.contrib"
#: the nodes run latkv's NumPy reference: numba compiling inside an onnxruntime callback
#: corrupts the process (a later session's teardown segfaults; onnxruntime 1.32,
#: onnxruntime-extensions 0.15); its codes are bit-identical to the numba path's
BACKEND = "numpy"
#: the most code arrays a quantizer writes (TurboQuant-prod with statistics and outliers: 12)
MAX_ARRAYS = 14
_all_registered = False
#: messages of node bodies that failed since `take_errors` last ran (see `_reporting`)
_errors: list[str] = []


#: stand-in leading sizes (distinct primes): a probe layout tells the per-vector arrays apart
PROBE_LEAD = (1009, 1013)


def probe_layout(qz: Quantizer) -> dict[str, tuple[tuple[int | None, ...], str]]:
    """``qz.code_layout`` for inputs ``(*PROBE_LEAD, dim)``: the arrays' names in node order,
    their dtypes, and which axes are the leading ones."""
    return qz.code_layout((*PROBE_LEAD, qz.dim))


def op_type(what: str, keys: Quantizer, values: Quantizer | None = None) -> str:
    """``LatkvEncodeN`` / ``LatkvDecodeN`` / ``LatkvScoresN`` / ``LatkvCompressedAttentionNxM``
    with ``N``, ``M`` the number of code arrays of the key (value) quantizer."""
    counts = [len(probe_layout(qz)) for qz in ((keys, values) if what == "attention" else (keys,))]
    if max(counts) > MAX_ARRAYS:
        raise ValueError(f"custom ops take at most {MAX_ARRAYS} code arrays, got {counts}")
    if what == "attention":
        return f"LatkvCompressedAttention{counts[0]}x{counts[1]}"
    return f"Latkv{what.capitalize()}{counts[0]}"


def build_custom(what: str, keys: Quantizer, values: Quantizer, dtype: str,
                 leading: tuple[str, ...], scale: float | None) -> tuple[Graph, int]:
    """The custom-flavour graph: graph inputs -> one latkv node -> graph outputs."""
    from latkv.onnx.model import FORMAT_VERSION, array_shapes

    for qz in (keys, values) if what == "attention" else (keys,):
        if what != "encode" and qz.variable_rate:
            raise ValueError(f"{qz.spec}: its streams do not record how many vectors they hold, "
                             f"so a {what} node cannot rebuild its Codes; the custom flavour "
                             "exports only its encode (decode with latkv)")
    g = Graph(f"latkv_{what}_{keys.name}_custom")
    g.domains[DOMAIN] = 1
    dim = keys.dim
    key_shapes = array_shapes(keys, leading)
    attributes: dict[str, Any] = {"spec": keys.spec, "latkv_format": FORMAT_VERSION}
    query_shape = [*leading[:-1], "queries", dim]
    if what == "encode":
        inputs = [g.input("x", dtype, [*leading, dim])]
        outputs = [(k, d, s) for k, (s, d) in key_shapes.items()]
    elif what == "decode":
        inputs = [g.input(k, d, s) for k, (s, d) in key_shapes.items()]
        outputs = [("x_hat", dtype, [*leading, dim])]
    elif what == "scores":
        inputs = [g.input("q", dtype, query_shape)]
        inputs += [g.input(k, d, s) for k, (s, d) in key_shapes.items()]
        outputs = [("scores", "float32", [*leading[:-1], "queries", leading[-1]])]
    else:
        inputs = [g.input("q", dtype, query_shape)]
        inputs += [g.input("key_" + k, d, s) for k, (s, d) in key_shapes.items()]
        inputs += [g.input("value_" + k, d, s)
                   for k, (s, d) in array_shapes(values, leading).items()]
        outputs = [("attention", dtype, query_shape)]
        attributes["value_spec"] = values.spec
        attributes["scale"] = float(1.0 / np.sqrt(dim) if scale is None else scale)
    from onnx import helper

    # every array crosses the node as float64 (exact for the uint8/uint16/float16/float32 code
    # arrays): one fixed signature per op type, registered once (see `register_custom_ops`)
    node_inputs = [g.op("Cast", i, to=onnx_type("float64"), hint="as_float64") for i in inputs]
    node_outputs = [g.fresh(name) for name, _, _ in outputs]
    g.nodes.append(helper.make_node(op_type(what, keys, values), node_inputs, node_outputs,
                                    domain=DOMAIN, **attributes))
    for (name, output_dtype, shape), value in zip(outputs, node_outputs):
        g.nodes.append(helper.make_node("Cast", [value], [name], to=onnx_type(output_dtype)))
        g.outputs.append(helper.make_tensor_value_info(name, onnx_type(output_dtype), shape))
    return g, 18


# -- what the nodes run -----------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _quantizer(spec: str) -> Quantizer:
    from latkv.registry import quantizer

    return quantizer(spec)


def codes_from_arrays(qz: Quantizer, arrays: tuple[np.ndarray, ...], dtype: str) -> Codes:
    """Codes from the node's input arrays (in ``code_layout`` order); the encoded shape is
    read off the first array that has one row per vector."""
    probe = probe_layout(qz)
    names = list(probe)
    lead = None
    for name, array in zip(names, arrays):
        shape = probe[name][0]
        if len(shape) >= 3 and tuple(shape[:2]) == PROBE_LEAD and array.ndim >= 1:
            lead = tuple(array.shape[: array.ndim - (len(shape) - 2)])
            break
    if lead is None:
        raise ValueError(f"cannot tell the encoded shape from the arrays of {qz.spec}")
    codes = Codes(qz.name, qz.params, (*lead, qz.dim), dtype,
                  {name: np.ascontiguousarray(a, dtype=probe[name][1])  # came as float64
                   for name, a in zip(names, arrays)})
    qz.check_codes(codes)
    return codes


def run_encode(x: np.ndarray, spec: str, latkv_format: int) -> tuple[np.ndarray, ...]:
    qz = _quantizer(spec)
    codes = qz.encode(np.asarray(x, dtype=np.float32), backend=BACKEND)
    return tuple(codes[name].astype(np.float64) for name in qz.code_layout(tuple(x.shape)))


def run_decode(*arrays: np.ndarray, spec: str, latkv_format: int) -> np.ndarray:
    qz = _quantizer(spec)
    codes = codes_from_arrays(qz, arrays, "float32")
    return qz.decode(codes, backend=BACKEND).astype(np.float64)


def run_scores(q: np.ndarray, *arrays: np.ndarray, spec: str, latkv_format: int) -> np.ndarray:
    qz = _quantizer(spec)
    q = np.asarray(q, dtype=np.float32)
    codes = codes_from_arrays(qz, arrays, "float32")
    return qz.scores(q, codes, backend=BACKEND).astype(np.float64)


def run_attention(q: np.ndarray, *arrays: np.ndarray, spec: str, value_spec: str,
                  latkv_format: int, scale: float) -> np.ndarray:
    keys, values = _quantizer(spec), _quantizer(value_spec)
    q = np.asarray(q, dtype=np.float32)
    count = len(probe_layout(keys))
    key_codes = codes_from_arrays(keys, arrays[:count], "float32")
    value_codes = codes_from_arrays(values, arrays[count:], "float32")
    logits = keys.scores(q, key_codes, backend=BACKEND).astype(np.float64) * scale
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    return values.weighted_sum(weights.astype(np.float32), value_codes,
                               backend=BACKEND).astype(np.float64)


def _reporting(body: Any, outputs: int) -> Any:
    """``body`` that never raises: an exception escaping a Python op aborts the whole process
    (onnxruntime-extensions 0.15 rethrows it as a C++ exception nothing catches), so the error
    is recorded (`take_errors`; `latkv.onnx.session`'s ``run`` raises it as ``ValueError``),
    printed to stderr, and the node returns NaN."""

    @functools.wraps(body)
    def guarded(*inputs: np.ndarray, **attributes: Any) -> Any:
        try:
            return body(*inputs, **attributes)
        except Exception as error:  # noqa: BLE001 - anything escaping aborts the process
            message = f"{type(error).__name__}: {error}"
            _errors.append(message)
            print(f"latkv custom op {body.__name__} failed: {message}", file=sys.stderr)
            failed = tuple(np.full(1, np.nan) for _ in range(outputs))
            return failed if outputs > 1 else failed[0]

    return guarded


def take_errors() -> list[str]:
    """The failures of latkv's custom ops since the last call (and forget them)."""
    errors = list(_errors)
    _errors.clear()
    return errors


# -- registration -----------------------------------------------------------------------------


def check_custom_nodes(model: Any, entries: dict[str, str]) -> None:
    """Refuse a custom model whose node disagrees with its metadata (op type, attributes,
    number and names of inputs and outputs)."""
    from latkv.onnx.model import FORMAT_VERSION

    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    others = [n.op_type for n in model.graph.node if n.domain != DOMAIN and n.op_type != "Cast"]
    if len(nodes) != 1 or others:
        raise ValueError(f"a custom latkv model has one {DOMAIN} node (and Casts), found "
                         f"{[n.op_type for n in model.graph.node]}")
    node = nodes[0]
    keys = _quantizer(entries["latkv_spec"])
    values = _quantizer(entries.get("latkv_value_spec", entries["latkv_spec"]))
    expected = op_type(entries["latkv_what"], keys, values)
    if node.op_type != expected:
        raise ValueError(f"the node is {node.op_type!r}; {entries['latkv_spec']!r} "
                         f"({entries['latkv_what']}) needs {expected!r}")
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attributes = {k: v.decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
    wanted = {"spec": keys.spec, "latkv_format": FORMAT_VERSION}
    if entries["latkv_what"] == "attention":
        wanted["value_spec"] = values.spec
    for name, value in wanted.items():
        if attributes.get(name) != value:
            raise ValueError(f"node attribute {name!r} is {attributes.get(name)!r}, expected "
                             f"{value!r} (the model's metadata)")
    allowed = set(wanted) | ({"scale"} if entries["latkv_what"] == "attention" else set())
    unknown = set(attributes) - allowed
    if unknown:
        raise ValueError(f"node has unknown attributes {sorted(unknown)}")
    if entries["latkv_what"] == "attention":
        scale = attributes.get("scale")
        if not isinstance(scale, float) or not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"node attribute 'scale' must be a positive float, got {scale!r}")


def _register_all() -> None:
    """Register every latkv op type once, before onnxruntime-extensions' library is loaded
    into any session: the library hands onnxruntime pointers into its list of Python ops, and
    a later registration moves that list, leaving earlier sessions with dangling kernels (a
    segfault when they are destroyed; onnxruntime-extensions 0.15). Registering your own
    ``onnx_op`` after a latkv custom session exists is unsafe for the same reason."""
    global _all_registered
    if _all_registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    real = PyCustomOpDef.dt_double
    attributes = {"spec": PyCustomOpDef.dt_string, "latkv_format": PyCustomOpDef.dt_int64}
    attention_attributes = {**attributes, "value_spec": PyCustomOpDef.dt_string,
                            "scale": PyCustomOpDef.dt_float}
    for count in range(1, MAX_ARRAYS + 1):
        onnx_op(op_type=f"LatkvEncode{count}", inputs=[real], outputs=[real] * count,
                attrs=attributes)(_reporting(run_encode, count))
        onnx_op(op_type=f"LatkvDecode{count}", inputs=[real] * count, outputs=[real],
                attrs=attributes)(_reporting(run_decode, 1))
        onnx_op(op_type=f"LatkvScores{count}", inputs=[real] * (count + 1), outputs=[real],
                attrs=attributes)(_reporting(run_scores, 1))
        for value_count in range(1, MAX_ARRAYS + 1):
            onnx_op(op_type=f"LatkvCompressedAttention{count}x{value_count}",
                    inputs=[real] * (1 + count + value_count), outputs=[real],
                    attrs=attention_attributes)(_reporting(run_attention, 1))
    _all_registered = True


def register_custom_ops(model: Any, options: Any) -> None:
    """Load onnxruntime-extensions' library, with latkv's op types, into ``options``."""
    from onnxruntime_extensions import get_library_path

    _register_all()
    options.register_custom_ops_library(get_library_path())

"""A small ONNX graph builder and the pieces every latkv graph shares.

`Graph` collects nodes, initializers, inputs and outputs and names every value uniquely; the
functions below it build the shared pieces of the standard-flavour graphs out of standard ONNX
ops, each the exact counterpart of a latkv reference so that encode graphs write the same bits:

- `pack_bits` / `unpack_bits`: the LSB-first layout of `latkv.packing` with BitShift,
  BitwiseAnd and integer sums;
- `vector_norms`: ``||y||`` summed in float64, as `latkv.qjl.vector_norms`;
- `count_below`: the number of boundaries strictly below a value, which is
  ``searchsorted(boundaries, u, side="left")``;
- `rows` / `restore_rows`: a ``(..., k)`` value as ``(rows, k)`` and back (the leading shape is
  read at run time, so batch and token axes stay dynamic).

Values are referred to by name (``str``); shapes are rank-agnostic where the op allows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ONNX_TYPES = {
    "float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
    "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13,
}


def onnx_type(dtype: Any) -> int:
    """The ``onnx.TensorProto`` element type of a NumPy dtype."""
    return ONNX_TYPES[np.dtype(dtype).name]


class Graph:
    """Nodes, initializers and named values of one ONNX graph under construction.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.onnx.graph import Graph
    >>> g = Graph("double")
    >>> x = g.input("x", "float32", ["n"])
    >>> g.output(g.op("Mul", x, g.constant(np.float32(2), "two")), "y", "float32", ["n"])
    >>> g.model(opset=21).graph.node[0].op_type
    'Mul'
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.domains: dict[str, int] = {}
        self._names: set[str] = set()
        self._count = 0
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        """A new internal value name ``hint.N`` (inputs and outputs have no dot in their
        names, so they never clash)."""
        self._count += 1
        name = f"{hint}.{self._count}"
        self._names.add(name)
        return name

    def input(self, name: str, dtype: Any, shape: list[Any]) -> str:
        from onnx import helper

        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, onnx_type(dtype), shape))
        return name

    def output(self, value: str, name: str, dtype: Any, shape: list[Any] | None) -> None:
        """Expose ``value`` as the graph output ``name`` (an Identity node renames it)."""
        from onnx import helper

        self._names.add(name)
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, onnx_type(dtype), shape))

    def constant(self, value: Any, hint: str = "const") -> str:
        """An initializer holding ``value`` (its NumPy dtype kept); equal constants are shared."""
        from onnx import numpy_helper

        array = np.asarray(value)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def axes(self, *axes: int) -> str:
        """An int64 vector constant: the axes (or sizes) operand of Unsqueeze, Reduce*, ..."""
        return self.constant(np.array(axes, np.int64))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "",
           hint: str | None = None, **attributes: Any) -> Any:
        """Add one node; returns its output name (a list of names when ``outputs > 1``)."""
        from onnx import helper

        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain or None,
                                           **attributes))
        return names[0] if outputs == 1 else names

    def model(self, opset: int, metadata: dict[str, str] | None = None) -> Any:
        """The ``onnx.ModelProto``: this graph at ``opset`` plus any custom domains used."""
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        imports = [helper.make_opsetid("", opset)]
        imports += [helper.make_opsetid(d, v) for d, v in sorted(self.domains.items())]
        model = helper.make_model(graph, opset_imports=imports, producer_name="latkv")
        # the IR version onnxruntime reads back to 1.18 (IR 10 since onnx 1.16)
        model.ir_version = min(model.ir_version, 10)
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model


# -- shapes -----------------------------------------------------------------------------------


def leading_shape(g: Graph, x: str) -> str:
    """``shape(x)[:-1]`` as an int64 vector."""
    return g.op("Shape", x, end=-1, hint="lead")


def rows(g: Graph, x: str, width: int) -> str:
    """``x : (..., width)`` as ``(rows, width)``."""
    return g.op("Reshape", x, g.constant(np.array([-1, width], np.int64)), hint="rows")


def restore_rows(g: Graph, x: str, lead: str, tail: tuple[int, ...]) -> str:
    """``x : (rows, *tail)`` back to ``(*lead, *tail)`` (``lead`` from `leading_shape`)."""
    shape = g.op("Concat", lead, g.constant(np.array(tail, np.int64)), axis=0)
    return g.op("Reshape", x, shape, hint="restored")


def last_axis_sum(g: Graph, x: str, keepdims: int = 0) -> str:
    return g.op("ReduceSum", x, g.axes(-1), keepdims=keepdims)


# -- the shared pieces ------------------------------------------------------------------------


def _pack_whole_bytes(g: Graph, codes: str, bits: int, n: int) -> str:
    """`pack_bits` where ``bits`` divides 8 and ``n`` fills whole bytes: the ``8 / bits``
    codes of a byte shifted into place and OR-ed (no bit planes)."""
    per_byte = 8 // bits
    width = n // per_byte
    lead = leading_shape(g, codes)
    grouped = g.op("Reshape", codes, g.constant(np.array([-1, width, per_byte], np.int64)))
    parts = g.op("Split", grouped, axis=2, outputs=per_byte, num_outputs=per_byte,
                 hint="code") if per_byte > 1 else [grouped]
    packed = None
    for position, part in enumerate(parts):
        shifted = part if position == 0 else g.op(
            "BitShift", part, g.constant(np.uint8(position * bits)), direction="LEFT")
        packed = shifted if packed is None else g.op("BitwiseOr", packed, shifted)
    return restore_rows(g, packed, lead, (width,))


def _unpack_whole_bytes(g: Graph, packed: str, bits: int, n: int) -> str:
    """`unpack_bits` where ``bits`` divides 8 and ``n`` fills whole bytes: each byte shifted
    right by ``0, bits, 2 bits, ...`` and masked (no bit planes)."""
    lead = leading_shape(g, packed)
    width = n * bits // 8
    flat = rows(g, packed, width)
    shifted = g.op("BitShift", g.op("Unsqueeze", flat, g.axes(-1)),
                   g.constant(np.arange(0, 8, bits, dtype=np.uint8)), direction="RIGHT")
    codes = g.op("BitwiseAnd", shifted, g.constant(np.uint8((1 << bits) - 1)))
    codes = g.op("Cast", g.op("Reshape", codes, g.constant(np.array([-1, n], np.int64))),
                 to=onnx_type("int64"))
    return restore_rows(g, codes, lead, (n,))


def pack_bits(g: Graph, codes: str, bits: int, n: int) -> str:
    """`latkv.pack_bits` of ``codes : (..., n)`` uint8 -> ``(..., ceil(n bits / 8))`` uint8."""
    if bits == 8:
        return codes
    if 8 % bits == 0 and n % (8 // bits) == 0:
        return _pack_whole_bytes(g, codes, bits, n)
    width = (n * bits + 7) // 8
    lead = leading_shape(g, codes)
    flat = rows(g, codes, n)
    plane = g.op("BitShift", g.op("Unsqueeze", flat, g.axes(-1)),
                 g.constant(np.arange(bits, dtype=np.uint8)), direction="RIGHT")
    plane = g.op("BitwiseAnd", plane, g.constant(np.uint8(1)))
    plane = g.op("Reshape", plane, g.constant(np.array([-1, n * bits], np.int64)))
    if width * 8 != n * bits:  # unused high bits of the last byte are zero
        plane = g.op("Pad", plane, g.constant(np.array([0, 0, 0, width * 8 - n * bits],
                                                       np.int64)))
    plane = g.op("Cast", g.op("Reshape", plane, g.constant(np.array([-1, width, 8], np.int64))),
                 to=onnx_type("int32"))
    weighted = g.op("Mul", plane, g.constant((1 << np.arange(8)).astype(np.int32)))
    packed = g.op("Cast", last_axis_sum(g, weighted), to=onnx_type("uint8"))
    return restore_rows(g, packed, lead, (width,))


def unpack_bits(g: Graph, packed: str, bits: int, n: int) -> str:
    """`latkv.unpack_bits`: ``(..., ceil(n bits / 8))`` uint8 -> ``(..., n)`` int64 codes."""
    width = (n * bits + 7) // 8
    if bits == 8:
        return g.op("Cast", packed, to=onnx_type("int64"))
    if 8 % bits == 0 and n % (8 // bits) == 0:
        return _unpack_whole_bytes(g, packed, bits, n)
    lead = leading_shape(g, packed)
    flat = rows(g, packed, width)
    plane = g.op("BitShift", g.op("Unsqueeze", flat, g.axes(-1)),
                 g.constant(np.arange(8, dtype=np.uint8)), direction="RIGHT")
    plane = g.op("BitwiseAnd", plane, g.constant(np.uint8(1)))
    plane = g.op("Reshape", plane, g.constant(np.array([-1, width * 8], np.int64)))
    if width * 8 != n * bits:
        plane = g.op("Slice", plane, g.constant(np.array([0], np.int64)),
                     g.constant(np.array([n * bits], np.int64)),
                     g.constant(np.array([1], np.int64)))
    plane = g.op("Cast", g.op("Reshape", plane, g.constant(np.array([-1, n, bits], np.int64))),
                 to=onnx_type("int64"))
    weighted = g.op("Mul", plane, g.constant((1 << np.arange(bits)).astype(np.int64)))
    return restore_rows(g, last_axis_sum(g, weighted), lead, (n,))


def vector_norms(g: Graph, y: str) -> str:
    """``||y||`` over the last axis summed in float64 (float64 result; `latkv.qjl.vector_norms`)."""
    y64 = g.op("Cast", y, to=onnx_type("float64"))
    return g.op("Sqrt", last_axis_sum(g, g.op("Mul", y64, y64)), hint="norm")


def count_below(g: Graph, u: str, boundaries: np.ndarray) -> str:
    """``sum(boundaries < u_j)`` per element: ``(..., d)`` float32 -> ``(..., d)`` uint8.

    Equals ``searchsorted(boundaries, u, side="left")`` for the ``2^b - 1`` increasing
    ``boundaries`` of a ``b``-bit codebook: a binary search of ``b`` steps, each adding
    ``2^k`` to the code where the boundary just past it is still below ``u`` (Gather, Less,
    Where) rather than ``2^b - 1`` comparisons per element.
    """
    boundaries = np.asarray(boundaries, np.float32)
    bits = int(len(boundaries) + 1).bit_length() - 1
    if len(boundaries) != (1 << bits) - 1:
        raise ValueError(f"count_below needs 2^b - 1 boundaries, got {len(boundaries)}")
    # boundaries shifted by one (entry c is boundary c - 1), so a candidate indexes directly
    table = g.constant(np.concatenate([[-np.inf], boundaries]).astype(np.float32),
                       "boundaries")
    step = 1 << (bits - 1)

    def taken(boundary: str, size: int) -> str:   # size where boundary < u, else 0 (int32)
        below = g.op("Cast", g.op("Less", boundary, u), to=onnx_type("int32"))
        return below if size == 1 else g.op("Mul", below, g.constant(np.int32(size)))

    code = taken(g.constant(boundaries[step - 1]), step)
    for k in range(bits - 2, -1, -1):
        candidate = g.op("Add", code, g.constant(np.int32(1 << k)))
        code = g.op("Add", code, taken(g.op("Gather", table, candidate, axis=0), 1 << k))
    return g.op("Cast", code, to=onnx_type("uint8"), hint="codes")


def safe_divisor(g: Graph, norm64: str) -> str:
    """``where(norm > 0, norm, 1)`` as float32 (a zero vector divides by 1)."""
    norm32 = g.op("Cast", norm64, to=onnx_type("float32"))
    one = g.constant(np.float32(1))
    return g.op("Where", g.op("Greater", norm32, g.constant(np.float32(0))), norm32, one)


def float16_from_float64(g: Graph, value: str) -> str:
    """``value.astype(float16)`` of a float64 ``value``, rounded once, as NumPy does.

    onnxruntime's Cast double -> float16 goes through float32 and so rounds twice (wrong in
    about 1 of 20 000 values). Here: the float16 spacing of ``|value|``'s binade, ``2^(e - 10)``
    with ``e = max(floor(log2 |value|), -14)`` (counted against exact powers of two;
    subnormals share ``2^-24``), then ``Round(|value| / spacing) * spacing`` (half to even,
    exact in float64), the sign put back; past 65504 the result is ``inf``, as NumPy's.
    """
    magnitude = g.op("Abs", value)
    powers = g.constant(2.0 ** np.arange(-13, 16, dtype=np.float64), "binades")
    above = g.op("GreaterOrEqual", g.op("Unsqueeze", magnitude,
                                        g.axes(-1)), powers)
    binade = last_axis_sum(g, g.op("Cast", above, to=onnx_type("int64")))
    spacings = 2.0 ** (np.arange(-14, 16, dtype=np.float64) - 10)
    spacing = g.op("Gather", g.constant(spacings, "float16_spacings"), binade, axis=0)
    rounded = g.op("Mul", g.op("Round", g.op("Div", magnitude, spacing)), spacing)
    overflow = g.op("Greater", rounded, g.constant(np.float64(np.finfo(np.float16).max)))
    rounded = g.op("Where", overflow, g.constant(np.float64(np.inf)), rounded)
    # negative, -0.0 included: 1 / value < 0
    negative = g.op("Less", g.op("Div", g.constant(np.float64(1)), value),
                    g.constant(np.float64(0)))
    # a sign factor, not Where(negative, -rounded, rounded): onnxruntime's Where drops the
    # sign of -0.0
    sign = g.op("Where", negative, g.constant(np.float64(-1)), g.constant(np.float64(1)))
    signed = g.op("Mul", rounded, sign)
    # exact from here: the value is a float16 (or inf) already
    return g.op("Cast", g.op("Cast", signed, to=onnx_type("float32")),
                to=onnx_type("float16"), hint="float16")


def gather_rows(g: Graph, table: np.ndarray, index: str, hint: str) -> str:
    """``table[index]`` for an int64 ``index`` of any shape (float32 result)."""
    return g.op("Gather", g.constant(np.asarray(table, np.float32), hint), index, axis=0)

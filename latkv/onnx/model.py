"""`export`: a quantizer's encode, decode, scores or attention as an ONNX model.

Every model carries metadata (``latkv_format``, ``latkv_version``, ``latkv_what``,
``latkv_flavour``, ``latkv_spec`` and, for attention, ``latkv_value_spec``) that
`latkv.onnx.session` checks before it runs anything.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from latkv.checks import check_choice
from latkv.onnx import channel_transform
from latkv.onnx.graph import Graph, onnx_type
from latkv.quantizer import Quantizer

#: version of the graph contract (inputs, outputs, metadata); models of another are refused
FORMAT_VERSION = 1
WHATS = ("encode", "decode", "scores", "attention")
FLAVOURS = ("standard", "custom")
DTYPES = ("float32", "float16")
#: two sets of stand-ins for the symbolic sizes (distinct primes): a size of ``code_layout`` that
#: moves with them is data-dependent, one equal to a stand-in is that leading axis
_PROBES = ((1009, 1013, 1019, 1021, 1031, 1033), (2003, 2011, 2017, 2027, 2029, 2039))
#: token counts that blocks of a power of two divide (a method with a tail block changes its
#: arrays with the count, which a graph with a dynamic token axis cannot follow)
_EVEN_TOKENS = 4096


def _as_quantizer(value: Any, name: str) -> Quantizer:
    if isinstance(value, str):
        from latkv.registry import quantizer

        return quantizer(value)
    if not isinstance(value, Quantizer):
        raise TypeError(f"{name} must be a latkv quantizer or a spec string, got "
                        f"{type(value).__name__}")
    return value


def quantizer_pair(quantizer: Any, values: Any = None) -> tuple[Quantizer, Quantizer | None]:
    """``(key quantizer, value quantizer)`` from a quantizer, a spec (``"K|V"`` allowed) or a
    pair; the value quantizer defaults to the key one."""
    if isinstance(quantizer, (tuple, list)):
        if len(quantizer) != 2 or values is not None:
            raise ValueError("quantizer must be one quantizer or a (keys, values) pair")
        quantizer, values = quantizer
    if isinstance(quantizer, str) and "|" in quantizer:
        if values is not None:
            raise ValueError("give the value quantizer either in the spec 'K|V' or as values=")
        quantizer, values = quantizer.split("|", 1)
    keys = _as_quantizer(quantizer, "quantizer")
    value_quantizer = keys if values is None else _as_quantizer(values, "values")
    if value_quantizer.dim != keys.dim:
        raise ValueError(f"keys and values need the same dim, got {keys.dim} and "
                         f"{value_quantizer.dim}")
    return keys, value_quantizer


def array_shapes(qz: Quantizer, leading: tuple[str, ...]) -> dict[str, tuple[list[Any], str]]:
    """Name -> (ONNX shape, dtype) of the code arrays for inputs ``(*leading, dim)``.

    A size equal to one of the leading axes gets that axis's name; other data-dependent sizes
    (groups of tokens) are left unnamed.
    """
    if len(leading) > len(_PROBES[0]):
        raise ValueError(f"at most {len(_PROBES[0])} leading axes, got {len(leading)}")
    layouts = [qz.code_layout((*probe[: len(leading)], qz.dim)) for probe in _PROBES]
    even = qz.code_layout((*_PROBES[0][: len(leading) - 1], _EVEN_TOKENS, qz.dim))
    if list(layouts[0]) != list(layouts[1]) or list(layouts[0]) != list(even) or any(
            len(layouts[0][k][0]) != len(layouts[1][k][0]) for k in layouts[0]):
        raise ValueError(f"{qz.spec} writes different arrays for different token counts; a "
                         "graph with dynamic axes cannot express it")
    names = dict(zip(_PROBES[0], leading))
    shapes = {}
    for key, (shape, dtype) in layouts[0].items():
        other = layouts[1][key][0]
        shapes[key] = ([names.get(a, a if a == b else None) for a, b in zip(shape, other)],
                       dtype)
    return shapes


def metadata(what: str, flavour: str, keys: Quantizer, values: Quantizer | None,
             dtype: str) -> dict[str, str]:
    from latkv import __version__

    entries = {"latkv_format": str(FORMAT_VERSION), "latkv_version": __version__,
               "latkv_what": what, "latkv_flavour": flavour, "latkv_spec": keys.spec,
               "latkv_dtype": dtype}
    if what == "attention":
        entries["latkv_value_spec"] = values.spec
    return entries


def _float_input(g: Graph, name: str, dtype: str, shape: list[Any]) -> str:
    value = g.input(name, dtype, shape)
    return value if dtype == "float32" else g.op("Cast", value, to=onnx_type("float32"))


def _array_inputs(g: Graph, qz: Quantizer, leading: tuple[str, ...],
                  prefix: str = "") -> dict[str, str]:
    return {key: g.input(prefix + key, dtype, shape)
            for key, (shape, dtype) in array_shapes(qz, leading).items()}


def build_standard(what: str, keys: Quantizer, values: Quantizer, dtype: str,
                   leading: tuple[str, ...], scale: float | None,
                   window: bool = False) -> tuple[Graph, int]:
    """The standard-flavour graph of ``what`` and the lowest opset it needs."""
    from latkv.onnx.standard import standard_module

    key_module = standard_module(keys)
    dim = keys.dim
    g = Graph(f"latkv_{what}_{keys.name}")
    opset = key_module.OPSET
    if what == "encode":
        x = _float_input(g, "x", dtype, [*leading, dim])
        statistics, y = channel_transform.fit_and_apply(g, keys, x)
        arrays = {**statistics, **key_module.encode(g, keys, y)}
        for key, (shape, array_dtype) in array_shapes(keys, leading).items():
            g.output(arrays[key], key, array_dtype, shape)
    elif what == "decode":
        arrays = _array_inputs(g, keys, leading)
        x_hat = decoded(g, keys, key_module, arrays)
        if dtype != "float32":
            x_hat = g.op("Cast", x_hat, to=onnx_type(dtype))
        g.output(x_hat, "x_hat", dtype, [*leading, dim])
    elif what == "scores":
        q = _float_input(g, "q", dtype, [*leading[:-1], "queries", dim])
        arrays = _array_inputs(g, keys, leading)
        g.output(scores(g, q, keys, key_module, arrays, len(leading) + 1), "scores", "float32",
                 [*leading[:-1], "queries", leading[-1]])
    else:
        value_module = standard_module(values)
        opset = max(opset, value_module.OPSET)
        q = _float_input(g, "q", dtype, [*leading[:-1], "queries", dim])
        key_arrays = _array_inputs(g, keys, leading, "key_")
        value_arrays = _array_inputs(g, values, leading, "value_")
        exact = None
        if window:
            shape = [*leading[:-1], "window", dim]
            exact = (_float_input(g, "key_window", dtype, shape),
                     _float_input(g, "value_window", dtype, shape))
        output = attention_graph(g, q, keys, key_module, key_arrays, values, value_module,
                                 value_arrays, len(leading) + 1, scale, exact)
        if dtype != "float32":
            output = g.op("Cast", output, to=onnx_type(dtype))
        g.output(output, "attention", dtype, [*leading[:-1], "queries", dim])
    return g, opset


def _transpose_last(g: Graph, value: str, rank: int) -> str:
    order = list(range(rank - 2)) + [rank - 1, rank - 2]
    return g.op("Transpose", value, perm=order)


def _statistics(arrays: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in arrays.items() if k in ("channel_mean", "channel_scale")}


def decoded(g: Graph, qz: Quantizer, module: Any, arrays: dict[str, str]) -> str:
    """``x_hat`` from the arrays: the stage's estimate rotated back, the statistics undone."""
    y_hat = module.unrotate(g, qz, module.rotated_decode(g, qz, arrays))
    return channel_transform.invert(g, y_hat, _statistics(arrays))


def scores(g: Graph, q: str, qz: Quantizer, module: Any, arrays: dict[str, str],
           rank: int) -> str:
    """``q @ x_hat^T`` as ``<R (q * scale), y_hat> + <q, mean>``: one rotation per query."""
    statistics = _statistics(arrays)
    rotated = module.rotate(g, qz, channel_transform.transformed_query(g, q, statistics))
    result = g.op("MatMul", rotated,
                  _transpose_last(g, module.rotated_decode(g, qz, arrays), rank))
    offset = channel_transform.query_offset(g, q, statistics)
    return result if offset is None else g.op("Add", result, offset)


def weighted_sum(g: Graph, weights: str, qz: Quantizer, module: Any,
                 arrays: dict[str, str]) -> str:
    """``weights @ x_hat``: summed in the stage's domain, rotated back once per query."""
    summed = module.unrotate(g, qz, g.op("MatMul", weights,
                                         module.rotated_decode(g, qz, arrays)))
    totals = g.op("ReduceSum", weights, g.axes(-1), keepdims=1)
    return channel_transform.invert(g, summed, _statistics(arrays), totals)


def attention_graph(g: Graph, q: str, keys: Quantizer, key_module: Any,
                    key_arrays: dict[str, str], values: Quantizer, value_module: Any,
                    value_arrays: dict[str, str], rank: int, scale: float | None,
                    window: tuple[str, str] | None = None) -> str:
    """``softmax(scale q K_hat^T) V_hat`` from the codes: scores in the key quantizer's domain,
    the value sum in the value quantizer's, rotated back once per query. With ``window``
    (exact float32 keys and values of the newest tokens, as `latkv.KVCache` keeps them) one
    softmax runs over the compressed tokens followed by the window's."""
    scale = 1.0 / np.sqrt(keys.dim) if scale is None else float(scale)
    factor = g.constant(np.float32(scale))
    logits = g.op("Mul", scores(g, q, keys, key_module, key_arrays, rank), factor)
    if window is None:
        return weighted_sum(g, g.op("Softmax", logits, axis=-1), values, value_module,
                            value_arrays)
    key_window, value_window = window
    window_logits = g.op("Mul", g.op("MatMul", q, _transpose_last(g, key_window, rank)),
                         factor)
    weights = g.op("Softmax", g.op("Concat", logits, window_logits, axis=-1), axis=-1)
    sizes = g.op("Concat", g.op("Shape", logits, start=-1), g.op("Shape", window_logits,
                                                                 start=-1), axis=0)
    compressed, exact = g.op("Split", weights, sizes, axis=-1, outputs=2)
    return g.op("Add", weighted_sum(g, compressed, values, value_module, value_arrays),
                g.op("MatMul", exact, value_window))


def export(quantizer: Any, what: str = "encode", path: str | os.PathLike | None = None, *,
           flavour: str = "standard", opset: int | None = None, dtype: str = "float32",
           leading: tuple[str, ...] = ("batch", "heads", "tokens"), values: Any = None,
           scale: float | None = None, window: bool = False) -> Any:
    """A quantizer's ``encode``, ``decode``, ``scores`` or ``attention`` as an ONNX model.

    Parameters
    ----------
    quantizer : Quantizer, spec string or (keys, values) pair
        For ``what="attention"`` the key quantizer (``"K|V"`` specs and pairs give both).
    what : {"encode", "decode", "scores", "attention"}
        ``encode``: input ``x : (*leading, dim)``, outputs the arrays of ``code_layout``
        (bit-identical to ``quantizer.encode``). ``decode``: those arrays in, ``x_hat`` out.
        ``scores``: ``q : (*leading[:-1], queries, dim)`` and the arrays of
        ``(*leading, dim)`` keys in, ``scores : (*leading[:-1], queries, tokens)`` float32 out.
        ``attention``: ``q``, the key arrays prefixed ``key_`` and the value arrays prefixed
        ``value_`` in, ``attention = softmax(scale q K^T) V : (*leading[:-1], queries, dim)``.
    path : str or PathLike, optional
        Where to write the model (atomically: a complete file or none).
    flavour : {"standard", "custom"}
        Standard ONNX ops only, or one ``ai.onnx.contrib`` node that runs latkv itself
        (`latkv.onnx.session` registers it).
    opset : int, optional
        The default ONNX opset; by default the lowest the graph needs.
    dtype : {"float32", "float16"}
        The float inputs' (and decoded outputs') element type.
    leading : tuple of str
        Names of the dynamic axes before ``dim``; the last is the token axis.
    values : Quantizer or spec, optional
        The value quantizer of an attention graph (default: ``quantizer``).
    scale : float, optional
        Attention's logit scale (default ``1 / sqrt(dim)``).
    window : bool
        Attention only: two more inputs, ``key_window`` and ``value_window`` of shape
        ``(*leading[:-1], window, dim)``, the newest tokens kept exact (`latkv.KVCache`'s
        float16 window); the softmax runs over the compressed tokens and them together.

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker`` and shape inference.

    Examples
    --------
    >>> import numpy as np, latkv, latkv.onnx
    >>> qz = latkv.TurboQuant(dim=64, bits=4)
    >>> model = latkv.onnx.export(qz, "encode")
    >>> [output.name for output in model.graph.output]
    ['packed', 'norm']
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 5, 64)).astype(np.float32)
    >>> packed, norm = latkv.onnx.session(model).run(None, {"x": x})
    >>> bool((packed == qz.encode(x)["packed"]).all())
    True
    """
    import onnx

    check_choice(what, "what", WHATS)
    check_choice(flavour, "flavour", FLAVOURS)
    check_choice(dtype, "dtype", DTYPES)
    leading = tuple(leading)
    if not leading or not all(isinstance(a, str) and a for a in leading) \
            or len(set(leading)) != len(leading):
        raise ValueError(f"leading must be distinct non-empty axis names, got {leading!r}")
    if what in ("scores", "attention") and "queries" in leading:
        raise ValueError("leading must not use the name 'queries' (the query axis)")
    if what != "attention" and (values is not None or isinstance(quantizer, (tuple, list))
                                or (isinstance(quantizer, str) and "|" in quantizer)):
        raise ValueError("a value quantizer (values=, a pair or 'K|V') is only for "
                         "what='attention'")
    keys, value_quantizer = quantizer_pair(quantizer, values)
    if window and (what != "attention" or flavour != "standard"):
        raise ValueError("window=True is for what='attention' in the standard flavour")
    if flavour == "standard":
        g, needed = build_standard(what, keys, value_quantizer, dtype, leading, scale, window)
    else:
        from latkv.onnx.custom import build_custom

        g, needed = build_custom(what, keys, value_quantizer, dtype, leading, scale)
    latest = onnx.defs.onnx_opset_version()
    if opset is None:
        opset = needed
    elif not isinstance(opset, int) or isinstance(opset, bool) or not needed <= opset <= latest:
        raise ValueError(f"opset must be an int in [{needed}, {latest}] for this graph "
                         f"(onnx {onnx.__version__}), got {opset!r}")
    model = g.model(opset, metadata(what, flavour, keys, value_quantizer, dtype))
    onnx.checker.check_model(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if path is not None:
        write_model(model, path)
    return model


def write_model(model: Any, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".latkv-", suffix=".onnx")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(model.SerializeToString())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise

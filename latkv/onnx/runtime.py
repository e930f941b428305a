"""`session`: an onnxruntime InferenceSession for a latkv model, after checking what it is."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from latkv.onnx.model import FLAVOURS, FORMAT_VERSION, WHATS

REQUIRED = ("latkv_format", "latkv_version", "latkv_what", "latkv_flavour", "latkv_spec",
            "latkv_dtype")


def load(model: Any) -> Any:
    """An ``onnx.ModelProto`` from a path, bytes or a model; ``ValueError`` if unreadable."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        data = bytes(model)
        source = "the model bytes"
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        with open(source, "rb") as stream:
            data = stream.read()
    else:
        raise TypeError(f"model must be a path, bytes or onnx.ModelProto, got "
                        f"{type(model).__name__}")
    from google.protobuf.message import DecodeError

    parsed = onnx.ModelProto()
    try:
        parsed.ParseFromString(data)
    except DecodeError as error:
        raise ValueError(f"{source} is not an ONNX model (truncated or corrupted): "
                         f"{error}") from None
    if not parsed.graph.node:
        raise ValueError(f"{source} is not an ONNX model (no graph nodes; truncated or "
                         "corrupted?)")
    return parsed


def model_metadata(model: Any) -> dict[str, str]:
    """The latkv metadata of ``model``, checked: ``ValueError`` names what is wrong."""
    from latkv import __version__
    from latkv.registry import quantizer

    entries = {p.key: p.value for p in model.metadata_props}
    missing = [key for key in REQUIRED if key not in entries]
    if missing:
        raise ValueError(f"the model lacks latkv metadata {missing}: not exported by "
                         "latkv.onnx.export (or from a latkv older than ONNX format "
                         f"{FORMAT_VERSION}); re-export it")
    try:
        version = int(entries["latkv_format"])
    except ValueError:
        raise ValueError(f"latkv_format {entries['latkv_format']!r} is not an integer") from None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"the model has latkv ONNX format {version} (latkv {entries['latkv_version']}); "
            f"this latkv {__version__} reads format {FORMAT_VERSION}: re-export it with "
            "latkv.onnx.export")
    if entries["latkv_what"] not in WHATS or entries["latkv_flavour"] not in FLAVOURS:
        raise ValueError(f"latkv_what {entries['latkv_what']!r} / latkv_flavour "
                         f"{entries['latkv_flavour']!r} not among {WHATS} / {FLAVOURS}")
    for key in ("latkv_spec", "latkv_value_spec"):
        if key in entries:
            try:
                quantizer(entries[key])
            except (TypeError, ValueError) as error:
                raise ValueError(f"the model's {key} {entries[key]!r} is not a valid "
                                 f"quantizer: {error}") from None
    return entries


def session(model: Any, providers: list[str] | None = None, options: Any = None) -> Any:
    """A ready ``onnxruntime.InferenceSession`` for a model of `latkv.onnx.export`.

    Parameters
    ----------
    model : path, bytes or onnx.ModelProto
    providers : list of str, optional
        onnxruntime execution providers (default: CUDA where available, then CPU).
    options : onnxruntime.SessionOptions, optional

    Returns
    -------
    onnxruntime.InferenceSession
        With latkv's custom ops registered for the custom flavour; its ``run`` first checks
        the feeds as latkv would (`check_feeds`: finite floats, code arrays of the model's
        quantizer) and raises ``ValueError`` rather than computing on bad input.

    Raises
    ------
    ValueError
        The model is not a latkv export, has another ONNX format version, names an invalid
        quantizer, or (custom flavour) its nodes' attributes disagree with its metadata.

    Examples
    --------
    >>> import numpy as np, latkv, latkv.onnx
    >>> qz = latkv.ScalarQuant(dim=8, bits=4, group=8)
    >>> model = latkv.onnx.export(qz, "decode")
    >>> sess = latkv.onnx.session(model, providers=["CPUExecutionProvider"])
    >>> sess.latkv_metadata["latkv_what"], sess.latkv_metadata["latkv_spec"]
    ('decode', 'scalar:4,dim=8,group=8,axis=token')
    >>> codes = qz.encode(np.random.default_rng(0).standard_normal((1, 2, 3, 8)))
    >>> (x_hat,) = sess.run(None, dict(codes.arrays))
    >>> bool((x_hat == qz.decode(codes)).all())
    True
    >>> sess.run(None, {**codes.arrays, "scale": codes["scale"].astype(np.float32)})
    Traceback (most recent call last):
    ValueError: input 'scale' must be float16, got float32
    """
    import onnxruntime

    model = load(model)
    entries = model_metadata(model)
    options = options or onnxruntime.SessionOptions()
    if entries["latkv_flavour"] == "custom":
        from latkv.onnx.custom import check_custom_nodes, register_custom_ops

        check_custom_nodes(model, entries)
        register_custom_ops(model, options)
    if providers is None:
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in available]
    checked = _checked_session_class()(model.SerializeToString(), options, providers=providers)
    checked.latkv_metadata = entries
    return checked


def check_feeds(entries: dict[str, str], feeds: dict[str, Any]) -> None:
    """Refuse what latkv would refuse before onnxruntime sees it: non-finite or empty float
    inputs, and code arrays that the model's quantizer did not write (shapes, dtypes, values).

    The ``run`` of a `session` calls it on every feed.

    Parameters
    ----------
    entries : dict of str to str
        The model's latkv metadata (``latkv_what``, ``latkv_spec``, ...: a session's
        ``latkv_metadata``).
    feeds : dict of str to array
        The inputs by name: float ``x``, ``q``, ``key_window``, ``value_window`` and the code
        arrays of ``code_layout`` (prefixed ``key_`` and ``value_`` for attention).

    Raises
    ------
    ValueError
        Naming the input: a missing code array, a wrong dtype or shape, NaN or Inf.

    Examples
    --------
    >>> import numpy as np, latkv, latkv.onnx
    >>> from latkv.onnx.runtime import check_feeds
    >>> qz = latkv.ScalarQuant(dim=8, bits=4, group=8)
    >>> model = latkv.onnx.export(qz, "decode")
    >>> entries = {entry.key: entry.value for entry in model.metadata_props}
    >>> codes = qz.encode(np.random.default_rng(0).standard_normal((1, 2, 3, 8)))
    >>> check_feeds(entries, dict(codes.arrays))        # what qz wrote: accepted
    >>> check_feeds(entries, {"packed": codes["packed"]})
    Traceback (most recent call last):
    ValueError: missing inputs ['scale', 'zero']
    >>> short = {**codes.arrays, "packed": codes["packed"][..., :3]}     # a byte short a row
    >>> check_feeds(entries, short)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: the code arrays do not fit ...: codes array 'packed' has shape (1, 2, 3, 3) ...
    """
    from latkv.checks import check_float_array
    from latkv.onnx.custom import codes_from_arrays, probe_layout
    from latkv.registry import quantizer

    for name in ("x", "q", "key_window", "value_window"):
        if name in feeds:
            check_float_array(np.asarray(feeds[name]), name)
    what = entries["latkv_what"]
    if what == "encode":
        return
    keys = quantizer(entries["latkv_spec"])
    groups = [(keys, "key_" if what == "attention" else "")]
    if what == "attention":
        groups.append((quantizer(entries["latkv_value_spec"]), "value_"))
    for qz, prefix in groups:
        expected = probe_layout(qz)
        names = [prefix + key for key in expected]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}")
        if qz.variable_rate:
            continue
        arrays = [np.asarray(feeds[n]) for n in names]
        for name, array, (_, dtype) in zip(names, arrays, expected.values()):
            if array.dtype != np.dtype(dtype):
                raise ValueError(f"input {name!r} must be {dtype}, got {array.dtype}")
        try:
            codes_from_arrays(qz, tuple(arrays), "float32")
        except ValueError as error:
            raise ValueError(f"the {prefix or ''}code arrays do not fit {qz.spec!r}: "
                             f"{error}") from None


@functools.lru_cache(maxsize=1)
def _checked_session_class() -> type:
    import onnxruntime

    class LatkvSession(onnxruntime.InferenceSession):
        """An InferenceSession whose ``run`` checks the feeds first (`check_feeds`) and
        raises the failures of latkv's custom ops as ``ValueError``."""

        latkv_metadata: dict[str, str]

        def run(self, output_names: Any, input_feed: dict[str, Any],
                run_options: Any = None) -> Any:
            from latkv.onnx.custom import take_errors

            check_feeds(self.latkv_metadata, input_feed)
            take_errors()
            result = super().run(output_names, input_feed, run_options)
            errors = take_errors()
            if errors:
                raise ValueError("latkv custom op failed: " + "; ".join(errors))
            return result

    return LatkvSession

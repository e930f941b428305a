"""One registry of quantizers: spec strings, stable numeric ids, classes.

A spec string is ``name[:value][,key=value...]``: the optional positional value sets the
method's main parameter (``bits`` for ``"scalar:4"``), the rest are constructor arguments.
``latkv.quantizer("scalar:2,axis=channel", dim=128)`` builds ``ScalarQuant(dim=128, bits=2,
axis="channel")``. The numeric id goes into saved files and never changes, so files survive
a rename of the method. Tests, benchmarks, the CLI and the docs iterate over `METHODS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from latkv.container import Codes
    from latkv.quantizer import Quantizer

METHODS: dict[str, type["Quantizer"]] = {}
_BY_ID: dict[int, type["Quantizer"]] = {}


def register(name: str, method_id: int, main_parameter: str) -> Callable[[type], type]:
    """Class decorator: register a quantizer under ``name`` with a stable ``method_id``."""

    def decorate(cls: type) -> type:
        if name in METHODS or method_id in _BY_ID:
            raise ValueError(f"method {name!r} or id {method_id} is registered twice")
        cls.name = name
        cls.method_id = method_id
        cls.main_parameter = main_parameter
        METHODS[name] = cls
        _BY_ID[method_id] = cls
        return cls

    return decorate


def method_class(name: str) -> type["Quantizer"]:
    """The class registered as ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None


def method_class_by_id(method_id: int) -> type["Quantizer"]:
    """The class registered with the stable numeric id ``method_id``."""
    try:
        return _BY_ID[method_id]
    except KeyError:
        raise ValueError(
            f"unknown method id {method_id}; registered: "
            f"{ {i: c.name for i, c in sorted(_BY_ID.items())} }"
        ) from None


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if text == "None":  # as format_spec writes it; "none" stays a string (scale=none)
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name[:value][,key=value...]"`` into the method name and its arguments."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a non-empty string like 'scalar:4', got {spec!r}")
    head, *options = [part.strip() for part in spec.split(",")]
    name, _, value = head.partition(":")
    cls = method_class(name.strip())
    arguments: dict[str, Any] = {}
    if value:
        arguments[cls.main_parameter] = _parse_value(value)
    for option in options:
        key, equals, text = option.partition("=")
        if not equals or not key:
            raise ValueError(f"spec option {option!r} in {spec!r} is not key=value")
        if key in arguments:
            raise ValueError(f"spec {spec!r} sets {key!r} twice")
        arguments[key.strip()] = _parse_value(text.strip())
    return cls.name, arguments


def quantizer(spec: str, dim: int | None = None, **overrides: Any) -> "Quantizer":
    """Build a quantizer from a spec string.

    Parameters
    ----------
    spec : str
        ``name[:value][,key=value...]``, e.g. ``"scalar:4"`` or ``"scalar:2,axis=channel"``.
    dim : int, optional
        The vector dimension, unless the spec sets ``dim=``.
    **overrides
        Further constructor arguments (they win over the spec's).

    Examples
    --------
    >>> import latkv
    >>> latkv.quantizer("scalar:4,group=64", dim=128).bits_per_coordinate
    4.5
    """
    name, arguments = parse_spec(spec)
    if dim is not None:
        arguments["dim"] = dim
    arguments.update(overrides)
    if "dim" not in arguments:
        raise ValueError(f"spec {spec!r} needs a dim: pass dim= or add ',dim=N' to the spec")
    cls = METHODS[name]
    try:
        return cls(**arguments)
    except TypeError as error:
        raise ValueError(f"spec {spec!r}: {error}") from None


def format_value(value: Any) -> str:
    """A parameter as spec text: sequences join with ``-`` (``level_bits=4-2-2-2``)."""
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return str(value)


def format_spec(name: str, params: Mapping[str, Any]) -> str:
    """The canonical spec string of a method and its parameters (inverse of `parse_spec`)."""
    cls = method_class(name)
    main = params.get(cls.main_parameter)
    options = [f"{k}={format_value(v)}" for k, v in params.items() if k != cls.main_parameter]
    head = f"{name}:{format_value(main)}" if main is not None else name
    return ",".join([head, *options])


def quantizer_for(codes: "Codes") -> "Quantizer":
    """Rebuild the quantizer that wrote ``codes`` from their method and parameters.

    Parameters
    ----------
    codes : Codes
        Codes from ``encode`` or `latkv.load`; only their ``method`` and ``params`` are read.

    Returns
    -------
    Quantizer
        Equal to the quantizer that wrote ``codes`` (same class and parameters), so it
        decodes them and scores queries against them.

    Raises
    ------
    ValueError
        Unknown method, or parameters its constructor refuses.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.quantizer("scalar:3,group=32", dim=64)
    >>> codes = qz.encode(np.random.default_rng(0).standard_normal((4, 64)))
    >>> codes.method, codes.params
    ('scalar', {'dim': 64, 'bits': 3, 'group': 32, 'axis': 'token'})
    >>> latkv.quantizer_for(codes) == qz
    True
    >>> bool((latkv.quantizer_for(codes).decode(codes) == qz.decode(codes)).all())
    True
    """
    cls = method_class(codes.method)
    try:
        return cls(**dict(codes.params))
    except (TypeError, ValueError) as error:
        raise ValueError(f"codes name method {codes.method!r} with invalid parameters: {error}") \
            from None

"""The one interface every method follows (see ``Quantizer``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import numpy as np

from latkv._backend import array_module, resolve_backend
from latkv.checks import check_float_array
from latkv.container import Codes


class Quantizer:
    """Base of every latkv quantizer: a frozen config with no state beyond its parameters.

    Subclasses are frozen dataclasses registered with `latkv.registry.register`; they
    implement ``encode``, ``decode``, ``scores``, ``code_size``, ``code_layout`` and
    ``backends``. This base supplies the shared checks and the derived quantities.

    Examples
    --------
    Every method has the same interface; here TurboQuant at 4 bits on ``(heads, tokens, dim)``
    keys:

    >>> import numpy as np, latkv
    >>> qz = latkv.quantizer("turbo:4", dim=64)
    >>> isinstance(qz, latkv.Quantizer), qz.label, qz.code_size, qz.bits_per_coordinate
    (True, 'turbo:4', 34.0, 4.25)
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 16, 64)).astype(np.float32)
    >>> codes = qz.encode(x)
    >>> codes.nbytes == qz.encoded_nbytes(x.shape) == 2 * 16 * qz.code_size
    True
    >>> x_hat = qz.decode(codes)
    >>> x_hat.shape, x_hat.dtype
    ((2, 16, 64), dtype('float32'))
    >>> q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    >>> scores = qz.scores(q, codes)                       # q @ x_hat.T, from the codes
    >>> scores.shape, bool(np.allclose(scores, q @ x_hat.swapaxes(-1, -2), atol=1e-4))
    ((2, 3, 16), True)
    >>> latkv.quantizer(qz.spec) == qz
    True
    """

    name: ClassVar[str]
    method_id: ClassVar[int]
    main_parameter: ClassVar[str]
    #: backends with an implementation of this method's encode/decode
    backends: ClassVar[tuple[str, ...]] = ("numpy",)
    dim: int

    @property
    def params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-normalised (what ``Codes.params`` and files hold)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return json.loads(json.dumps(values))

    @property
    def spec(self) -> str:
        """Canonical spec string; ``latkv.quantizer(qz.spec)`` rebuilds an equal quantizer."""
        from latkv.registry import format_spec

        return format_spec(self.name, self.params)

    @property
    def label(self) -> str:
        """Short spec for tables: the method, its main value and non-default options.

        An option is a default when it equals the value the quantizer gets with only ``dim``
        and the main value given (defaults that depend on the main value count as defaults).
        """
        from latkv.registry import format_value

        main_value = getattr(self, self.main_parameter)
        try:
            defaults = type(self)(dim=self.dim, **{self.main_parameter: main_value}).params
        except (TypeError, ValueError):  # the defaults are invalid for this dim
            defaults = {f.name: f.default for f in dataclasses.fields(self)
                        if f.init and f.default is not dataclasses.MISSING}
        options = [f"{k}={format_value(v)}" for k, v in self.params.items()
                   if k not in ("dim", self.main_parameter) and defaults.get(k, object()) != v]
        main = format_value(self.params[self.main_parameter])
        return ",".join([f"{self.name}:{main}", *options])

    @property
    def code_size(self) -> float:  # pragma: no cover - abstract
        """Exact bytes per vector, side information included."""
        raise NotImplementedError

    @property
    def bits_per_coordinate(self) -> float:
        """Exact bits per coordinate, every scale, norm and index counted: ``8 code_size / dim``."""
        return self.code_size * 8 / self.dim

    @property
    def variable_rate(self) -> bool:
        """Whether the size of the codes depends on the data (entropy-coded streams).

        Such codes have arrays of data-dependent length (``None`` in `code_layout`);
        ``code_size`` is then the target and ``Codes.nbytes`` the measured size.
        """
        return False

    def code_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int | None, ...], str]]:
        """Name -> (shape, dtype) of every array ``encode`` writes for an input of ``shape``.

        A ``None`` length (variable-rate methods only) stands for a data-dependent length.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact ``Codes.nbytes`` for an input of ``shape`` (fixed-rate methods)."""
        layout = self.code_layout(tuple(shape))
        if any(s is None for array_shape, _ in layout.values() for s in array_shape):
            raise ValueError(f"{self.spec} writes data-dependent sizes (variable_rate); "
                             "measure Codes.nbytes of the encoded data instead")
        return int(sum(np.prod(s, dtype=np.int64) * np.dtype(d).itemsize
                       for s, d in layout.values()))

    # -- shared checks ------------------------------------------------------------------

    def check_input(self, x: Any, name: str = "x", min_ndim: int = 1) -> Any:
        """Check ``x : (..., dim)`` float16/32/64, finite and non-empty."""
        return check_float_array(x, name, dim=self.dim, min_ndim=min_ndim)

    @property
    def supported_backends(self) -> tuple[str, ...]:
        """The backends this configuration runs on: ``backends`` unless an option narrows it."""
        return type(self).backends

    def check_backend(self, backend: str | None, x: Any) -> str:
        backend = resolve_backend(backend, x)
        if backend not in self.supported_backends:
            fallback = "numpy"
            if backend in ("cupy", "numba.cuda"):
                raise ValueError(f"{self.name} has no {backend!r} implementation yet; "
                                 f"available: {self.supported_backends}")
            return fallback
        return backend

    def check_codes(self, codes: Any, name: str = "codes") -> None:
        """Raise unless ``codes`` were written by this quantizer and are internally consistent."""
        if not isinstance(codes, Codes):
            raise TypeError(f"{name} must be latkv.Codes, got {type(codes).__name__}")
        if codes.method != self.name or dict(codes.params) != self.params:
            raise ValueError(
                f"{name} were made by {codes.spec!r}, not by this quantizer {self.spec!r}"
            )
        shape = tuple(codes.shape)
        if len(shape) < 1 or shape[-1] != self.dim or any(s < 0 for s in shape):
            raise ValueError(f"{name} record input shape {shape}, which does not end in dim "
                             f"{self.dim}")
        if codes.dtype not in ("float16", "float32", "float64"):
            raise ValueError(f"{name} record input dtype {codes.dtype!r}")
        layout = self.code_layout(shape)
        if set(codes.arrays) != set(layout):
            raise ValueError(f"{name} hold arrays {sorted(codes.arrays)}, expected {sorted(layout)}")
        xp = None
        for key, (expected_shape, dtype) in layout.items():
            array = codes.arrays[key]
            fits = len(array.shape) == len(expected_shape) and all(
                e is None or e == a for a, e in zip(array.shape, expected_shape))
            if not fits or array.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{name} array {key!r} has shape {tuple(array.shape)} dtype {array.dtype}, "
                    f"expected {tuple(expected_shape)} {dtype}"
                    + (" (None: any length)" if None in tuple(expected_shape) else "")
                )
            module = array_module(array)
            if xp is not None and module is not xp:
                raise ValueError(f"{name} mix NumPy and CuPy arrays")
            xp = module

    def check_query(self, q: Any, codes: Codes) -> Any:
        """Check ``q : (..., m, dim)`` or ``(dim,)`` against codes of ``(..., n, dim)``."""
        q = check_float_array(q, "q", dim=self.dim)
        if len(codes.shape) < 2 and q.ndim > 1:
            raise ValueError("scores needs codes of shape (..., n, dim) for a batch of queries")
        if q.ndim > 1:
            try:
                np.broadcast_shapes(tuple(q.shape[:-2]), tuple(codes.shape[:-2]))
            except ValueError:
                raise ValueError(
                    f"q leading shape {tuple(q.shape[:-2])} does not broadcast with the codes' "
                    f"{tuple(codes.shape[:-2])}"
                ) from None
        if array_module(q) is not codes.xp:
            raise ValueError("q and codes must be in the same array module (NumPy or CuPy)")
        return q

    def make_codes(self, x: Any, arrays: dict[str, Any]) -> Codes:
        return Codes(self.name, self.params, tuple(int(s) for s in x.shape), str(x.dtype), arrays)

    # -- the interface ----------------------------------------------------------------

    def encode(self, x: Any, *, backend: str | None = None) -> Codes:  # pragma: no cover
        raise NotImplementedError

    def decode(self, codes: Codes, *, backend: str | None = None) -> Any:  # pragma: no cover
        raise NotImplementedError

    def check_weights(self, weights: Any, codes: Codes) -> Any:
        """Check ``weights : (..., m, n)`` against codes of ``(..., n, dim)``."""
        weights = check_float_array(weights, "weights", min_ndim=2)
        if len(codes.shape) < 2:
            raise ValueError("weighted_sum needs codes of shape (..., n, dim)")
        n = codes.shape[-2]
        if weights.shape[-1] != n:
            raise ValueError(f"weights must be (..., m, {n}) for codes of {n} vectors, got "
                             f"{tuple(weights.shape)}")
        try:
            np.broadcast_shapes(tuple(weights.shape[:-2]), tuple(codes.shape[:-2]))
        except ValueError:
            raise ValueError(f"weights leading shape {tuple(weights.shape[:-2])} does not "
                             f"broadcast with the codes' {tuple(codes.shape[:-2])}") from None
        if array_module(weights) is not codes.xp:
            raise ValueError("weights and codes must be in the same array module (NumPy or CuPy)")
        return weights

    def weighted_sum(self, weights: Any, codes: Codes, *, backend: str | None = None) -> Any:
        """``weights @ x_hat`` from the codes of ``x`` (an attention step's value sum).

        Parameters
        ----------
        weights : (..., m, n) float
        codes : Codes of x with shape (..., n, dim)

        Returns
        -------
        (..., m, dim) float32
            Here via ``decode``; rotation-based methods sum in the rotated domain and rotate
            each of the ``m`` results back once instead of every one of the ``n`` vectors.
        """
        self.check_codes(codes)
        weights = self.check_weights(weights, codes)
        xp = array_module(weights)
        x_hat = self.decode(codes, backend=backend).astype(xp.float32)
        return weights.astype(xp.float32) @ x_hat

    def scores(self, q: Any, codes: Codes, *, backend: str | None = None) -> Any:
        """Estimated ``q @ x.T`` from the codes of ``x`` (reference: via ``decode``)."""
        q = self.check_query(q, codes)
        xp = array_module(q)
        x_hat = self.decode(codes, backend=backend).astype(xp.float32)
        q = q.astype(xp.float32)
        if q.ndim == 1:
            return x_hat @ q
        return q @ xp.swapaxes(x_hat, -1, -2)

"""Norm-preserving rotations: Hadamard, randomized Hadamard, random orthogonal.

All three are orthogonal maps ``R`` of ``R^dim`` with ``apply(x) = x R^T`` acting on the last
axis and ``inverse(y) = y R`` undoing it. Inputs may be float16, float32 or float64, NumPy or
CuPy; outputs are float32 in the same array module.

Non-power-of-two dims (80, 96, 112, ...)
----------------------------------------
The fast Walsh-Hadamard transform needs a power-of-two length. For another ``dim``,
`RandomizedHadamard` takes ``p``, the largest power of two ``<= dim``, and composes two
overlapping Hadamard stages: a seeded permutation of the coordinates, random signs and
``H_p`` on the leading ``p`` coordinates, then new random signs and ``H_p`` on the trailing
``p`` coordinates. Each stage is orthogonal, so the product is. Because ``p > dim / 2`` the
windows overlap, but the mixing is weaker than one full-length Hadamard: measured on
``RandomizedHadamard(dim, seed).matrix()`` for seeds 0-2, each output depends on at least 63-64
of the inputs (not all), and the largest matrix entry is 0.13-0.31 against ``1/sqrt(dim)``
(0.09-0.11) for a perfectly flat rotation (dims 80, 96, 112). The seeded permutation keeps a
fixed outlier channel from always landing in the same place. The cost is two FWHTs of length
``p``. Use `RandomOrthogonal` where exact Haar mixing matters more than speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from latkv._backend import array_module, implementation, resolve_backend
from latkv.checks import check_float_array, check_int


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht_reference(x: Any) -> Any:
    """Unnormalised Walsh-Hadamard transform in Sylvester (natural) order along the last axis.

    ``x : (..., size)`` with ``size`` a power of two; returns ``x @ H_size`` where
    ``H_1 = [1]`` and ``H_2n = [[H_n, H_n], [H_n, -H_n]]``.
    """
    xp = array_module(x)
    *lead, size = x.shape
    y = x
    h = 1
    while h < size:
        # butterflies over pairs (i, i + h) inside blocks of 2h: (a, b) -> (a + b, a - b)
        blocks = y.reshape(*lead, size // (2 * h), 2, h)
        a, b = blocks[..., 0, :], blocks[..., 1, :]
        y = xp.stack((a + b, a - b), axis=-2).reshape(*lead, size)
        h *= 2
    return y


def hadamard_segment_reference(
    x: Any, start: int, size: int, signs: Any, inverse: bool
) -> Any:
    """One orthonormal Hadamard stage on ``x[..., start:start+size]`` (float32, copied).

    Forward: ``seg <- H_size (signs * seg) / sqrt(size)``. Inverse: ``seg <- signs * H_size seg
    / sqrt(size)`` (``H`` is symmetric and ``H H = size I``). Other coordinates pass through.
    """
    xp = array_module(x)
    y = x.astype(xp.float32, copy=True)
    segment = y[..., start : start + size]
    scale = xp.float32(1.0 / np.sqrt(size))
    if inverse:
        segment = fwht_reference(segment) * scale * signs
    else:
        segment = fwht_reference(segment * signs) * scale
    y[..., start : start + size] = segment
    return y


def randomized_hadamard_staged(
    x: Any, permutation: Any, head_signs: Any, tail_signs: Any, inverse: bool,
    stage: Any = hadamard_segment_reference,
) -> Any:
    """`RandomizedHadamard` as a sequence of ``hadamard_segment`` stages (float32, copied).

    Forward: ``y = x[..., permutation]``, then the stage with ``head_signs`` on
    ``y[..., :p]`` and the stage with ``tail_signs`` on ``y[..., dim - p:]`` (``p`` =
    ``len(head_signs)``). Inverse: the stages undone in reverse order, then
    ``out[..., permutation] = y``. With ``tail_signs=None`` (``dim == p``) it is the one head
    stage and ``permutation`` is ignored. ``stage`` is a ``hadamard_segment`` implementation
    (the NumPy reference by default; the GPU backends pass theirs).
    """
    xp = array_module(x)
    p = int(head_signs.shape[0])
    dim = int(x.shape[-1])
    if tail_signs is None:
        return stage(x, 0, p, head_signs, inverse)
    if not inverse:
        y = xp.take(x, permutation, axis=-1)
        y = stage(y, 0, p, head_signs, False)
        return stage(y, dim - p, p, tail_signs, False)
    y = stage(x, dim - p, p, tail_signs, True)
    y = stage(y, 0, p, head_signs, True)
    out = xp.empty_like(y)
    out[..., permutation] = y
    return out


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1 - 2 * rng.integers(0, 2, size=n)).astype(np.float32)


def _as_float32_input(x: Any, name: str, dim: int) -> Any:
    x = check_float_array(x, name, dim=dim)
    xp = array_module(x)
    return xp.ascontiguousarray(x, dtype=xp.float32)


def _device(array: np.ndarray, xp: Any) -> Any:
    return array if xp is np else xp.asarray(array)


class Rotation:
    """Common surface: ``dim``, ``apply``, ``inverse``, ``matrix``."""

    dim: int

    def apply(self, x: Any, *, backend: str | None = None) -> Any:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y: Any, *, backend: str | None = None) -> Any:  # pragma: no cover
        raise NotImplementedError

    def matrix(self) -> np.ndarray:
        """The dense ``(dim, dim)`` float64 matrix ``R`` with ``apply(x) == x @ R.T``."""
        eye = np.eye(self.dim, dtype=np.float32)
        return self.apply(eye, backend="numpy").astype(np.float64).T


@dataclass(frozen=True)
class Hadamard(Rotation):
    """Orthonormal Walsh-Hadamard transform ``x -> x H / sqrt(dim)`` (Sylvester order).

    Parameters
    ----------
    dim : int
        A power of two.

    Notes
    -----
    ``H / sqrt(dim)`` is symmetric and orthogonal, so ``inverse`` is the same transform.
    ``apply`` costs ``dim * log2(dim)`` additions per vector (fast Walsh-Hadamard transform).
    Equivalent to ``x @ scipy.linalg.hadamard(dim) / sqrt(dim)``.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.rotations import Hadamard
    >>> Hadamard(4).apply(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32))
    array([0.5, 0.5, 0.5, 0.5], dtype=float32)
    """

    dim: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 1))
        if not is_power_of_two(self.dim):
            raise ValueError(
                f"Hadamard needs dim to be a power of two, got {self.dim}; "
                "RandomizedHadamard handles any dim"
            )

    def _transform(self, x: Any, name: str, backend: str | None) -> Any:
        x = _as_float32_input(x, name, self.dim)
        backend = resolve_backend(backend, x)
        xp = array_module(x)
        ones = _device(np.ones(self.dim, dtype=np.float32), xp)
        return implementation("hadamard_segment", backend)(x, 0, self.dim, ones, False)

    def apply(self, x: Any, *, backend: str | None = None) -> Any:
        """``x : (..., dim)`` float -> ``(..., dim)`` float32, ``x H / sqrt(dim)``."""
        return self._transform(x, "x", backend)

    def inverse(self, y: Any, *, backend: str | None = None) -> Any:
        """``y : (..., dim)`` float -> ``(..., dim)`` float32; the same map as ``apply``."""
        return self._transform(y, "y", backend)


@dataclass(frozen=True)
class RandomizedHadamard(Rotation):
    """Random signs + fast Walsh-Hadamard transform, for any ``dim >= 1``.

    For a power-of-two ``dim``: ``apply(x) = H (D x) / sqrt(dim)`` with ``D`` a diagonal of
    seeded random signs. Otherwise two overlapping stages of size ``p`` (the largest power of
    two ``<= dim``) after a seeded permutation, as described in the module docstring.

    Parameters
    ----------
    dim : int
    seed : int
        Seeds ``numpy.random.default_rng``; the draws are, in order, the permutation (only
        when ``dim`` is not a power of two), the leading-stage signs and the trailing-stage
        signs (only when ``dim`` is not a power of two).

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.rotations import RandomizedHadamard
    >>> rot = RandomizedHadamard(96, seed=0)
    >>> x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    >>> bool(np.allclose(rot.inverse(rot.apply(x)), x, atol=1e-5))
    True
    """

    dim: int
    seed: int = 0
    permutation: np.ndarray = field(init=False, repr=False, compare=False)
    head_signs: np.ndarray = field(init=False, repr=False, compare=False)
    tail_signs: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 1))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))
        rng = np.random.default_rng(self.seed)
        p = self.block
        if p == self.dim:
            permutation = np.arange(self.dim)
            head, tail = _signs(rng, p), None
        else:
            permutation = rng.permutation(self.dim)
            head, tail = _signs(rng, p), _signs(rng, p)
        object.__setattr__(self, "permutation", permutation)
        object.__setattr__(self, "head_signs", head)
        object.__setattr__(self, "tail_signs", tail)

    @cached_property
    def block(self) -> int:
        """``p``: the largest power of two ``<= dim`` (the FWHT length)."""
        return 1 << (self.dim.bit_length() - 1)

    def _transform(self, x: Any, name: str, backend: str | None, inverse: bool) -> Any:
        x = _as_float32_input(x, name, self.dim)
        backend = resolve_backend(backend, x)
        xp = array_module(x)
        tail = None if self.tail_signs is None else _device(self.tail_signs, xp)
        return implementation("randomized_hadamard", backend)(
            x, _device(self.permutation, xp), _device(self.head_signs, xp), tail, inverse)

    def apply(self, x: Any, *, backend: str | None = None) -> Any:
        """``x : (..., dim)`` float -> ``(..., dim)`` float32, the rotated vectors."""
        return self._transform(x, "x", backend, False)

    def inverse(self, y: Any, *, backend: str | None = None) -> Any:
        """``y : (..., dim)`` float -> ``(..., dim)`` float32 with ``inverse(apply(x)) == x``."""
        return self._transform(y, "y", backend, True)


@dataclass(frozen=True)
class RandomOrthogonal(Rotation):
    """A Haar-random orthogonal matrix ``Q`` (QR of a seeded Gaussian, signs fixed).

    ``apply(x) = x Q^T`` and ``inverse(y) = y Q`` are dense matmuls (BLAS / cuBLAS): ``dim^2``
    multiply-adds per vector against ``dim log dim`` for `RandomizedHadamard`, with an
    exactly Haar-distributed rotation in exchange.

    Parameters
    ----------
    dim : int
    seed : int
        Seeds ``numpy.random.default_rng``, which draws the ``(dim, dim)`` Gaussian.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.rotations import RandomOrthogonal
    >>> q = RandomOrthogonal(8, seed=0).matrix()
    >>> bool(np.allclose(q @ q.T, np.eye(8), atol=1e-6))
    True
    """

    dim: int
    seed: int = 0
    orthogonal: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 1))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))
        gaussian = np.random.default_rng(self.seed).standard_normal((self.dim, self.dim))
        q, r = np.linalg.qr(gaussian)
        q = q * np.sign(np.diag(r))  # sign fix makes Q Haar-distributed (Mezzadri 2007)
        object.__setattr__(self, "orthogonal", q.astype(np.float32))

    def apply(self, x: Any, *, backend: str | None = None) -> Any:
        """``x : (..., dim)`` float -> ``(..., dim)`` float32, ``x Q^T``."""
        x = _as_float32_input(x, "x", self.dim)
        resolve_backend(backend, x)
        xp = array_module(x)
        return x @ _device(self.orthogonal, xp).T

    def inverse(self, y: Any, *, backend: str | None = None) -> Any:
        """``y : (..., dim)`` float -> ``(..., dim)`` float32, ``y Q``."""
        y = _as_float32_input(y, "y", self.dim)
        resolve_backend(backend, y)
        xp = array_module(y)
        return y @ _device(self.orthogonal, xp)

    def matrix(self) -> np.ndarray:
        return self.orthogonal.astype(np.float64)

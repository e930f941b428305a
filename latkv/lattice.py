"""The D8 and E8 lattices: exact nearest points (Conway and Sloane) and E8's short vectors.

``D8`` is the set of integer vectors with an even coordinate sum; ``E8 = D8 ∪ (D8 + ½·1)``,
the densest packing in 8 dimensions. Conway and Sloane ("Fast quantizing and decoding
algorithms for lattice quantizers and codes", IEEE Trans. Inf. Theory 28, 1982, Sec. III-IV):

* nearest ``D8`` point: round every coordinate; if the sum of the rounded vector is odd,
  re-round the coordinate that was farthest from its integer the other way;
* nearest ``E8`` point: the nearer of the nearest ``D8`` point of ``x`` and the nearest
  ``D8`` point of ``x - ½`` plus ``½``.

Tie rules (the specification; every backend follows them):

* rounding is to the nearest integer, halves to even (``numpy.rint``);
* the parity fix moves the coordinate with the largest ``|x_i - round(x_i)|``, the lowest index
  among equals, by one step towards ``x_i`` (upwards when ``x_i`` is an integer);
* the distances of the two candidates are sums of squares accumulated in float64 in coordinate
  order 0..7 of the float32 differences ``x_i - y_i`` (the square of a float32 value is exact
  in float64, so a fused multiply-add cannot change the sum); on a tie the ``D8`` candidate
  wins.

Inputs are float32 ``(..., 8)`` with ``|x_i| < 2^21``; lattice points are returned as float32
(exact half-integers). The float32 difference ``x_i - y_i`` is exact except for coordinates
far below 1 (``2^-30 - 0.5`` rounds); every backend computes the same float32 difference, so
they agree bit for bit regardless.

Backends: ``nearest_e8`` / ``nearest_d8`` run the NumPy reference, numba, a CUDA kernel through
CuPy, or numba.cuda (``backend=``; by default the array module of the input picks), all
bit-identical.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations, product
from typing import Any

import numpy as np

from latkv._backend import array_module, implementation, resolve_backend
from latkv.checks import check_float_array

#: largest |coordinate| the exact-arithmetic argument above covers
COORDINATE_LIMIT = float(1 << 21)


def _check_groups(x: Any, name: str = "x") -> Any:
    x = check_float_array(x, name, dim=8)
    xp = array_module(x)
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    if bool((xp.abs(x) >= COORDINATE_LIMIT).any()):
        raise ValueError(f"{name} has coordinates of magnitude >= 2^21; scale it first")
    return x


def _dispatch(operation: str, x: Any, backend: str | None) -> Any:
    x = _check_groups(x)
    backend = resolve_backend(backend, x)
    shape = x.shape
    flat = x.reshape(-1, 8)
    return implementation(operation, backend)(flat).reshape(shape)


def nearest_d8_reference(x: Any) -> Any:
    """Nearest ``D8`` point of each row of ``x : (..., 8)`` float32 (module tie rules).

    The NumPy/CuPy definition that every `nearest_d8` backend matches bit for bit; ``x`` must
    already be checked (float32, finite, ``|x_i| < 2^21``).

    Parameters
    ----------
    x : (..., 8) float32, NumPy or CuPy

    Returns
    -------
    (..., 8) float32

    Examples
    --------
    Rounding gives ``[0, 0, 1, 0, ...]`` of odd sum; coordinates 0 and 1 are equally far
    from their integers, so the lower index moves, towards ``x``:

    >>> import numpy as np
    >>> from latkv.lattice import nearest_d8_reference
    >>> nearest_d8_reference(np.array([0.5, 0.5, 1, 0, 0, 0, 0, 0], np.float32))
    array([1., 0., 1., 0., 0., 0., 0., 0.], dtype=float32)
    """
    xp = array_module(x)
    rounded = xp.rint(x)
    error = x - rounded                                        # exact in float32
    odd = (rounded.sum(axis=-1, dtype=xp.float64) % 2) != 0
    worst = xp.argmax(xp.abs(error), axis=-1)                  # first index among equals
    step = xp.where(xp.take_along_axis(error, worst[..., None], axis=-1)[..., 0] >= 0,
                    xp.float32(1), xp.float32(-1))
    fix = (xp.arange(8) == worst[..., None]) & odd[..., None]
    return xp.where(fix, rounded + step[..., None], rounded).astype(xp.float32)


def squared_distance(x: Any, y: Any) -> Any:
    """``sum_i (x_i - y_i)^2`` accumulated in float64 in coordinate order 0..7.

    Parameters
    ----------
    x, y : (..., 8) float32, NumPy or CuPy

    Returns
    -------
    (...,) float64

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.lattice import squared_distance
    >>> squared_distance(np.full((2, 8), 0.5, np.float32), np.zeros((2, 8), np.float32))
    array([2., 2.])
    """
    xp = array_module(x)
    difference = (x - y).astype(xp.float64)
    total = xp.zeros(x.shape[:-1], dtype=xp.float64)
    for i in range(8):
        total = total + difference[..., i] * difference[..., i]
    return total


def nearest_e8_reference(x: Any) -> Any:
    """Nearest ``E8`` point of each row of ``x : (..., 8)`` float32 (module tie rules).

    The NumPy/CuPy definition that every `nearest_e8` backend matches bit for bit; ``x`` must
    already be checked (float32, finite, ``|x_i| < 2^21``).

    Parameters
    ----------
    x : (..., 8) float32, NumPy or CuPy

    Returns
    -------
    (..., 8) float32

    Examples
    --------
    ``0.25 * 1`` is equally far (squared distance ``0.5``) from ``0`` and from ``0.5 * 1``;
    on a tie the ``D8`` candidate wins:

    >>> import numpy as np
    >>> from latkv.lattice import nearest_e8_reference
    >>> nearest_e8_reference(np.full((1, 8), 0.25, np.float32))
    array([[0., 0., 0., 0., 0., 0., 0., 0.]], dtype=float32)
    >>> nearest_e8_reference(np.full((1, 8), 0.26, np.float32))
    array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], dtype=float32)
    """
    xp = array_module(x)
    half = xp.float32(0.5)
    integer = nearest_d8_reference(x)
    coset = nearest_d8_reference(x - half) + half
    keep_integer = squared_distance(x, integer) <= squared_distance(x, coset)
    return xp.where(keep_integer[..., None], integer, coset)


def nearest_d8(x: Any, *, backend: str | None = None) -> Any:
    """Nearest point of ``D8`` (integer vectors with an even sum) to each 8-d row.

    Parameters
    ----------
    x : (..., 8) float16/32/64, NumPy or CuPy, finite, ``|x_i| < 2^21``
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"numba.cuda"``.

    Returns
    -------
    (..., 8) float32, integer-valued with an even sum per row.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.lattice import nearest_d8
    >>> nearest_d8(np.array([0.9, 0.4, 0, 0, 0, 0, 0, 0], np.float32))
    array([1., 1., 0., 0., 0., 0., 0., 0.], dtype=float32)
    """
    return _dispatch("nearest_d8", x, backend)


def nearest_e8(x: Any, *, backend: str | None = None) -> Any:
    """Nearest point of ``E8 = D8 ∪ (D8 + ½)`` to each 8-d row (module tie rules).

    Parameters
    ----------
    x : (..., 8) float16/32/64, NumPy or CuPy, finite, ``|x_i| < 2^21``
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"numba.cuda"``.

    Returns
    -------
    (..., 8) float32 lattice points (all integers with an even sum, or all half-integers
    whose sum is even after subtracting ½ from each).

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.lattice import nearest_e8
    >>> nearest_e8(np.full(8, 0.4, np.float32))
    array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=float32)
    """
    return _dispatch("nearest_e8", x, backend)


def is_e8(y: Any) -> Any:
    """Whether each row of ``y : (..., 8)`` is a point of ``E8`` (boolean ``(...,)``).

    Parameters
    ----------
    y : (..., 8) float, NumPy or CuPy

    Returns
    -------
    (...,) bool

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.lattice import is_e8
    >>> is_e8(np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],     # D8 + 1/2
    ...                 [1, 1, 0, 0, 0, 0, 0, 0],                     # D8: even sum
    ...                 [1, 0, 0, 0, 0, 0, 0, 0],                     # odd sum
    ...                 [-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]))  # odd after - 1/2
    array([ True,  True, False, False])
    """
    xp = array_module(y)
    doubled = xp.asarray(y, dtype=xp.float64) * 2
    integral = (doubled == xp.rint(doubled)).all(axis=-1)
    parity = doubled.astype(xp.int64) % 2                        # 0: integer, 1: half-integer
    same_coset = (parity == parity[..., :1]).all(axis=-1)
    shifted = (doubled - parity[..., :1]) / 2                    # the D8 part
    even = (shifted.sum(axis=-1) % 2) == 0
    return integral & same_coset & even


@lru_cache(maxsize=None)
def e8_short_vectors(squared_norm: int) -> np.ndarray:
    """All ``E8`` vectors of squared norm 2 (the 240 roots) or 4 (2160 vectors), float32.

    The roots are E8's Voronoi-relevant vectors; with the 2160 vectors of norm 4 they give
    a stronger check that a point is nearest (``tests/test_lattice.py``).

    Parameters
    ----------
    squared_norm : {2, 4}

    Returns
    -------
    (240, 8) or (2160, 8) float32
        Sorted rows (cached: do not modify).

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.lattice import e8_short_vectors, is_e8
    >>> roots = e8_short_vectors(2)
    >>> roots.shape, e8_short_vectors(4).shape, bool(is_e8(roots).all())
    ((240, 8), (2160, 8), True)
    >>> bool(((roots**2).sum(axis=1) == 2).all())
    True
    """
    if squared_norm not in (2, 4):
        raise ValueError(f"squared_norm must be 2 or 4, got {squared_norm}")
    candidates = set()
    integer_parts = {2: [(1, 1)], 4: [(2,), (1, 1, 1, 1)]}[squared_norm]
    for magnitudes in integer_parts:
        k = len(magnitudes)
        for positions in combinations(range(8), k):
            for signs in product((1, -1), repeat=k):
                v = [0.0] * 8
                for p, s, m in zip(positions, signs, magnitudes):
                    v[p] = s * m
                candidates.add(tuple(v))
    for signs in product((1, -1), repeat=8):
        if squared_norm == 2:
            candidates.add(tuple(s * 0.5 for s in signs))
        else:
            for big in range(8):
                candidates.add(tuple(s * (1.5 if i == big else 0.5) for i, s in enumerate(signs)))
    vectors = np.array(sorted(candidates), dtype=np.float32)
    vectors = vectors[is_e8(vectors)]
    return vectors[np.isclose((vectors.astype(np.float64) ** 2).sum(axis=1), squared_norm)]

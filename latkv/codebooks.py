"""Lloyd-Max scalar codebooks for known coordinate laws, computed with scipy and cached.

Lloyd-Max (Lloyd 1982, Max 1960) finds the ``L`` reconstruction points ``c_1 < ... < c_L``
minimising ``E[(t - c(t))^2]`` for a density ``f``: alternately set each boundary to the
midpoint of its neighbours, ``b_i = (c_i + c_{i+1}) / 2``, and each point to the conditional
mean of its cell, ``c_i = E[t | b_{i-1} < t <= b_i]``, until nothing moves. For log-concave
densities (all laws here) the fixed point is unique and the iteration converges to it.

The law of one coordinate of a uniformly random unit vector in ``R^d`` (TurboQuant, Zandieh et
al. 2025, arXiv 2504.19874, Lemma 1) has density ``f_d(t) = (1 - t^2)^((d-3)/2) / B(1/2,
(d-1)/2)`` on ``[-1, 1]``: ``t = 2B - 1`` with ``B ~ Beta((d-1)/2, (d-1)/2)``. Its cell
probabilities are regularised incomplete beta functions and its partial first moment has a
closed form, ``int t f_d(t) dt = -(1 - t^2)^((d-1)/2) / ((d-1) B(1/2, (d-1)/2))``, so the
iteration needs no numerical integration and converges to float64 precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import special

from latkv.checks import check_bits, check_int


@dataclass(frozen=True)
class Codebook:
    """A scalar codebook: ``2**bits`` sorted centroids and the ``2**bits - 1`` boundaries.

    Attributes
    ----------
    centroids : (2**bits,) float32
        Reconstruction points, increasing.
    boundaries : (2**bits - 1,) float32
        Cell edges, the midpoints of neighbouring centroids. A value ``t`` gets the code
        ``sum(boundaries < t)`` (``numpy.searchsorted(boundaries, t, side="left")``): a value
        on a boundary goes to the lower cell.
    distortion : float
        ``E[(t - c(t))^2]`` per coordinate under the law the codebook was made for (float64,
        computed with the float64 centroids).

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.codebooks import sphere_codebook
    >>> codebook = sphere_codebook(16, 2)
    >>> codebook.bits, [round(c, 4) for c in codebook.centroids.tolist()]
    (2, [-0.3672, -0.1125, 0.1125, 0.3672])
    >>> c = codebook.centroids
    >>> bool(np.allclose(codebook.boundaries, (c[1:] + c[:-1]) / 2))      # the midpoints
    True
    >>> t = np.array([-0.5, 0.0, 0.1, 0.3], np.float32)    # 0.0 is a boundary: the lower cell
    >>> np.searchsorted(codebook.boundaries, t, side="left")
    array([0, 1, 2, 3])
    """

    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float

    @property
    def bits(self) -> int:
        return int(self.centroids.shape[0]).bit_length() - 1


def lloyd_max(density: Callable[[np.ndarray], np.ndarray],
              cell_probability: Callable[[np.ndarray, np.ndarray], np.ndarray],
              cell_moment: Callable[[np.ndarray, np.ndarray], np.ndarray],
              second_moment: float, low: float, high: float, initial: np.ndarray,
              tolerance: float = 1e-13, max_iterations: int = 200) -> tuple[np.ndarray, float]:
    """Lloyd-Max fixed point on ``[low, high]``, solved by Newton's method on the boundaries.

    The conditions ``b_i = (c_i + c_{i+1}) / 2`` with ``c_i = E[t | b_{i-1} < t <= b_i]``
    are a tridiagonal system in the boundaries ``b``: ``dc_i/db_i = f(b_i) (b_i - c_i) / P_i``
    and ``dc_i/db_{i-1} = f(b_{i-1}) (c_i - b_{i-1}) / P_i``. Plain Lloyd iteration converges
    linearly at a rate ``1 - O(1/L^2)`` (hundreds of thousands of steps for 256 levels);
    Newton from a good start converges in a handful. Steps are halved until the boundaries stay
    increasing and the residual falls.

    Parameters
    ----------
    density : callable
        ``t -> f(t)`` (float64 arrays).
    cell_probability, cell_moment : callable
        ``(lower, upper) -> P(lower < t <= upper)`` and ``E[t; lower < t <= upper]`` for
        arrays of cell edges.
    second_moment : float
        ``E[t^2]``, for the distortion ``E[t^2] - sum_i P_i c_i^2`` at the fixed point.
    low, high : float
        Support of the law.
    initial : (levels,) float64
        Increasing starting centroids.

    Returns
    -------
    centroids : (levels,) float64
    distortion : float

    Examples
    --------
    The uniform law on ``[0, 1]``: its Lloyd-Max quantizer is the uniform grid, cell centres,
    with distortion ``width**2 / 12`` (``1 / 192`` for 4 levels), from any increasing start.

    >>> import numpy as np
    >>> from latkv.codebooks import lloyd_max
    >>> centroids, distortion = lloyd_max(
    ...     lambda t: np.ones_like(t),                     # density
    ...     lambda lower, upper: upper - lower,            # P(lower < t <= upper)
    ...     lambda lower, upper: (upper**2 - lower**2) / 2,  # E[t; lower < t <= upper]
    ...     1 / 3, 0.0, 1.0, initial=np.array([0.1, 0.2, 0.5, 0.9]))
    >>> centroids.round(12).tolist(), round(192 * distortion, 9)
    ([0.125, 0.375, 0.625, 0.875], 1.0)
    """
    from scipy.linalg import solve_banded

    initial = np.asarray(initial, dtype=np.float64)
    if initial.ndim != 1 or initial.size < 2 or (np.diff(initial) <= 0).any():
        raise ValueError("initial must hold at least 2 increasing values")
    scale = high - low

    def centroids_of(boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        edges = np.concatenate([[low], boundaries, [high]])
        probability = cell_probability(edges[:-1], edges[1:])
        safe = np.where(probability > 0, probability, 1.0)
        centroids = np.where(probability > 0, cell_moment(edges[:-1], edges[1:]) / safe,
                             (edges[:-1] + edges[1:]) / 2)
        return centroids, probability, safe

    def residual(boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centroids, probability, safe = centroids_of(boundaries)
        return boundaries - (centroids[:-1] + centroids[1:]) / 2, centroids, safe

    boundaries = (initial[1:] + initial[:-1]) / 2
    value, centroids, safe = residual(boundaries)
    for _ in range(max_iterations):
        error = float(np.abs(value).max())
        if error <= tolerance * scale:
            break
        f = density(boundaries)
        below = f * (boundaries - centroids[:-1]) / safe[:-1]   # dc_i / db_i (upper edge)
        above = f * (centroids[1:] - boundaries) / safe[1:]     # dc_{i+1} / db_i (lower edge)
        banded = np.zeros((3, boundaries.size))
        banded[1] = 1 - (below + above) / 2                      # dF_i / db_i
        banded[0, 1:] = -below[1:] / 2                           # dF_{i-1} / db_i
        banded[2, :-1] = -above[:-1] / 2                         # dF_{i+1} / db_i
        step = solve_banded((1, 1), banded, -value)
        length = 1.0
        while length > 1e-9:
            trial = boundaries + length * step
            if (np.diff(trial) > 0).all() and trial[0] > low and trial[-1] < high:
                trial_value, trial_centroids, trial_safe = residual(trial)
                if float(np.abs(trial_value).max()) < error:
                    break
            length /= 2
        else:
            # no step improves: float64 rounding of the cell integrals is the floor
            if error <= 1e-9 * scale:
                break
            raise RuntimeError(f"Lloyd-Max stalled at residual {error:.3g}")  # pragma: no cover
        boundaries, value, centroids, safe = trial, trial_value, trial_centroids, trial_safe
    else:  # pragma: no cover - log-concave laws converge long before this
        raise RuntimeError(f"Lloyd-Max did not converge in {max_iterations} Newton steps")
    _, probability, _ = centroids_of(boundaries)
    distortion = second_moment - float(np.sum(probability * centroids**2))
    return centroids, distortion


def sphere_coordinate_cdf(t: np.ndarray, dim: int) -> np.ndarray:
    """``P(T <= t)`` for one coordinate ``T`` of a uniform unit vector in ``R^dim``."""
    a = (dim - 1) / 2
    return special.betainc(a, a, (1 + np.clip(t, -1.0, 1.0)) / 2)


def sphere_coordinate_density(t: np.ndarray, dim: int) -> np.ndarray:
    """``f_dim(t) = (1 - t^2)^((dim-3)/2) / B(1/2, (dim-1)/2)`` on ``[-1, 1]`` (Lemma 1)."""
    t = np.asarray(t, dtype=np.float64)
    inside = np.abs(t) < 1
    value = np.exp((dim - 3) / 2 * np.log1p(-np.where(inside, t * t, 0.0))
                   - special.betaln(0.5, (dim - 1) / 2))
    return np.where(inside, value, 0.0)


def _sphere_cell_probability(dim: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    a = (dim - 1) / 2

    def probability(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        # upper tail via betaincc on the positive side: no cancellation in far cells
        lo, up = (1 + lower) / 2, (1 + upper) / 2
        left = special.betainc(a, a, up) - special.betainc(a, a, lo)
        right = special.betaincc(a, a, lo) - special.betaincc(a, a, up)
        return np.where(lower >= 0, right, left)

    return probability


def _sphere_cell_moment(dim: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    exponent = (dim - 1) / 2
    log_norm = np.log(dim - 1) + special.betaln(0.5, (dim - 1) / 2)

    def antiderivative(t: np.ndarray) -> np.ndarray:
        inside = np.abs(t) < 1
        one_minus = np.where(inside, 1 - t * t, 1.0)
        return np.where(inside, -np.exp(exponent * np.log(one_minus) - log_norm), 0.0)

    def moment(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        return antiderivative(upper) - antiderivative(lower)

    return moment


@lru_cache(maxsize=None)
def sphere_codebook(dim: int, bits: int) -> Codebook:
    """Lloyd-Max codebook for a coordinate of a uniform unit vector in ``R^dim`` (cached).

    Parameters
    ----------
    dim : int
        Dimension, >= 2.
    bits : int
        1..8; the codebook has ``2**bits`` centroids, symmetric about 0.

    Returns
    -------
    Codebook
        ``dim * codebook.distortion`` is the expected ``||x - x_hat||^2`` of a unit vector
        quantized coordinate by coordinate after a uniformly random rotation.

    Examples
    --------
    >>> from latkv.codebooks import sphere_codebook
    >>> [round(128 * sphere_codebook(128, b).distortion, 4) for b in (1, 2, 3, 4)]
    [0.3609, 0.116, 0.034, 0.0093]
    """
    dim = check_int(dim, "dim", 2)
    bits = check_bits(bits)
    levels = 1 << bits
    # start from the compander approximation (Panter-Dite): point density ~ f^(1/3), which is
    # again a symmetric Beta law, (1 - t^2)^((dim-3)/6); Lloyd-Max then needs few iterations
    quantiles = (np.arange(levels) + 0.5) / levels
    a = (dim - 3) / 6 + 1
    initial = 2 * special.betaincinv(a, a, quantiles) - 1
    centroids, distortion = lloyd_max(
        lambda t: sphere_coordinate_density(t, dim), _sphere_cell_probability(dim),
        _sphere_cell_moment(dim), 1.0 / dim, -1.0, 1.0, initial)
    centroids = (centroids - centroids[::-1]) / 2  # exact symmetry
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(centroids.astype(np.float32), boundaries.astype(np.float32),
                    float(distortion))


def _polar_angle_law(level: int) -> tuple[Callable, Callable, Callable, float]:
    """Density, cell probability, cell moment and ``E[psi^2]`` of a level-``level`` angle."""
    from scipy import integrate

    half = 2.0 ** (level - 1) / 2   # psi = atan(r2 / r1), r_i^2 ~ chi^2 with 2^(level-1) dof
    log_norm = np.log(2.0) - special.betaln(half, half)

    def density(psi: np.ndarray) -> np.ndarray:
        psi = np.asarray(psi, dtype=np.float64)
        inside = (psi > 0) & (psi < np.pi / 2)
        s, c = np.sin(np.where(inside, psi, 1.0)), np.cos(np.where(inside, psi, 1.0))
        value = np.exp(log_norm + (2 * half - 1) * (np.log(s) + np.log(c)))
        return np.where(inside, value, 0.0)

    def probability(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        return (special.betainc(half, half, np.sin(np.clip(upper, 0, np.pi / 2)) ** 2)
                - special.betainc(half, half, np.sin(np.clip(lower, 0, np.pi / 2)) ** 2))

    def moment(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        return np.array([integrate.quad(lambda t: t * density(t), a, b, epsabs=1e-15,
                                        epsrel=1e-12, limit=200)[0]
                         for a, b in zip(np.atleast_1d(lower), np.atleast_1d(upper))])

    second = integrate.quad(lambda t: t * t * density(t), 0, np.pi / 2, epsabs=1e-15,
                            epsrel=1e-12, limit=200)[0]
    return density, probability, moment, second


@lru_cache(maxsize=None)
def polar_angle_codebook(level: int, bits: int) -> Codebook:
    """Lloyd-Max codebook of a PolarQuant angle at ``level`` (PolarQuant, arXiv 2502.02617).

    After random preconditioning the coordinates are i.i.d. Gaussian in law, so the level-1
    angle ``atan2(y_2i+1, y_2i)`` is uniform on ``[0, 2 pi)`` (the codebook is the uniform grid,
    centroids at the cell centres) and a level-``l >= 2`` angle ``atan2(r_2, r_1)`` of two
    radii of ``2^(l-1)`` coordinates each has the density
    ``f_l(psi) = 2 sin^(k-1)(psi) cos^(k-1)(psi) / B(k/2, k/2)`` on ``[0, pi/2]``, ``k = 2^(l-1)``,
    i.e. ``∝ sin^(k-1)(2 psi)`` (``sin^2 psi ~ Beta(k/2, k/2)``).

    Parameters
    ----------
    level : int
        1 (pairs of coordinates) or more (pairs of radii).
    bits : int
        1..8.

    Returns
    -------
    Codebook
        Angles in radians; ``distortion`` is the angle's mean squared error.

    Examples
    --------
    >>> from latkv.codebooks import polar_angle_codebook
    >>> [round(c, 4) for c in polar_angle_codebook(1, 2).centroids.tolist()]
    [0.7854, 2.3562, 3.927, 5.4978]
    >>> [round(c, 4) for c in polar_angle_codebook(2, 1).centroids.tolist()]
    [0.5, 1.0708]
    """
    level = check_int(level, "level", 1)
    bits = check_bits(bits)
    levels = 1 << bits
    if level == 1:
        width = 2 * np.pi / levels
        centroids = (np.arange(levels) + 0.5) * width
        boundaries = np.arange(1, levels) * width
        return Codebook(centroids.astype(np.float32), boundaries.astype(np.float32),
                        width**2 / 12)
    density, probability, moment, second = _polar_angle_law(level)
    half = 2.0 ** (level - 1) / 2
    # compander start: point density ~ f^(1/3), again a sin^a cos^a law (a Beta in sin^2)
    a = (2 * half - 1) / 3 / 2 + 0.5
    quantiles = (np.arange(levels) + 0.5) / levels
    initial = np.arcsin(np.sqrt(special.betaincinv(a, a, quantiles)))
    centroids, distortion = lloyd_max(density, probability, moment, second, 0.0, np.pi / 2,
                                      initial, tolerance=1e-12)
    centroids = (centroids + (np.pi / 2 - centroids[::-1])) / 2   # symmetric about pi/4
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(centroids.astype(np.float32), boundaries.astype(np.float32),
                    float(distortion))

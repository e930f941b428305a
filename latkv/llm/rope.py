"""Rotary position embedding (RoPE, Su et al. 2021, arXiv 2104.09864, Eq. 34), rotate-half form.

Channel ``i < d/2`` of a head is paired with channel ``i + d/2`` (the HuggingFace layout; see
`latkv.llm.gguf_model` for how GGUF's interleaved layout is undone). At position ``m`` the
pair is rotated by the angle ``m * theta_i`` with ``theta_i = base ** (-2 i / d)``:

    (x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin)

which is multiplication of the complex number ``x_i + 1j x_{i+d/2}`` by ``exp(1j m theta_i)``.
"""

from __future__ import annotations

import numpy as np


def rope_angles(positions: np.ndarray, rope_dim: int, base: float,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin : (T, rope_dim / 2)`` float32 of the angles ``(positions / scale) * theta_i``.

    Parameters
    ----------
    positions : (T,) int
    rope_dim : int
        Even number of rotated channels.
    base : float
        ``theta`` base (10000 in the paper; GGUF ``rope.freq_base``).
    scale : float
        Linear position scaling (GGUF ``rope.scaling.factor``).

    Examples
    --------
    >>> cos, sin = rope_angles(np.arange(3), 4, 10000.0)
    >>> cos.shape, float(sin[1, 0]) == float(np.float32(np.sin(1.0)))
    ((3, 2), True)
    """
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    inverse_frequency = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = (np.asarray(positions, dtype=np.float64) / scale)[:, None] * inverse_frequency
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the leading ``2 * cos.shape[-1]`` channels of ``x : (..., T, d)``, rotate-half.

    Channels beyond ``rope_dim`` pass through. Returns a new float32 array.
    """
    half = cos.shape[-1]
    rotated = x[..., : 2 * half]
    first, second = rotated[..., :half], rotated[..., half:]
    out = np.array(x, dtype=np.float32, copy=True)
    out[..., :half] = first * cos - second * sin
    out[..., half : 2 * half] = second * cos + first * sin
    return out

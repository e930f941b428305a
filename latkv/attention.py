"""Attention from scalar-codebook codes in one pass: scores, softmax and the value sum.

This is the decode step of a `latkv.KVCache` whose keys and values are TurboQuant-mse codes
(a packed code per coordinate and one factor per vector). The cache is cut into blocks of
``block`` tokens and each (head, block) is reduced to a *partial* of the split-K softmax
("flash decoding"): with the logits of the block's tokens

    s_n = scale * (key_factor_n * <q_key, key_centroids[key_codes_n]> + key_offset)

the partial is ``max_b = max_n s_n``, ``sum_b = sum_n exp(s_n - max_b)`` and

    acc_b = sum_n exp(s_n - max_b) * value_factor_n * value_centroids[value_codes_n]

a ``(dim,)`` vector in the value quantizer's *rotated* domain. No key or value is decoded to
memory and nothing is rotated per token: the caller rotates each query once (into the key
rotation's domain, ``q_key``) and rotates the combined value sum back once
(`combine_partials`). ``q_key`` and ``key_offset`` may differ per block (per-block channel
statistics: ``q_key = R (q * channel_scale_b)``, ``key_offset = <q, channel_mean_b>``) or be
shared by all blocks (a block axis of length 1).

`codebook_attention_reference` is the NumPy/CuPy definition; the numba, CuPy RawModule and
numba.cuda kernels (``("codebook_attention", backend)`` in `latkv._backend`) return the same
partials to float32 rounding.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from latkv._backend import array_module
from latkv.checks import check_bits, check_int
from latkv.packing import packed_length
from latkv.turbo import codebook_dequantize_reference


def codebook_attention_reference(q_key: Any, key_packed: Any, key_factor: Any,
                                 key_centroids: Any, key_bits: int, key_offset: Any,
                                 value_packed: Any, value_factor: Any, value_centroids: Any,
                                 value_bits: int, dim: int, block: int,
                                 scale: float) -> tuple[Any, Any, Any]:
    """Split-softmax partials of attention over codebook-coded keys and values.

    Parameters
    ----------
    q_key : (H, 1 or blocks, m, dim) float32
        ``m`` queries per head, in the key quantizer's rotated domain (per block, or one set).
    key_packed : (H, N, ceil(dim * key_bits / 8)) uint8
        Packed key codes (`latkv.pack_bits` layout) of ``N = blocks * block`` tokens.
    key_factor : (H, N) float32
        The stored per-key factor (TurboQuant's norm).
    key_centroids : (2**key_bits,) float32
    key_bits : int
    key_offset : (H, 1 or blocks, m) float32
        Added to every dot product of the block before ``scale`` (0 without statistics).
    value_packed : (H, N, ceil(dim * value_bits / 8)) uint8
    value_factor : (H, N) float32
    value_centroids : (2**value_bits,) float32
    value_bits : int
    dim : int
    block : int
        Tokens per block; ``N`` must be a multiple.
    scale : float
        Logit scale (``1 / sqrt(dim)`` for standard attention).

    Returns
    -------
    acc : (H, blocks, m, dim) float32
    maximum : (H, blocks, m) float32
    total : (H, blocks, m) float32
        ``acc_b``, ``max_b`` and ``sum_b`` of the module docstring.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.packing import pack_bits
    >>> codes = np.zeros((1, 4, 8), np.uint8); codes[0, 1] = 1      # token 1: all ones
    >>> packed = pack_bits(codes, 1)
    >>> centroids = np.array([0.0, 1.0], np.float32)
    >>> q = np.ones((1, 1, 1, 8), np.float32)
    >>> ones = np.ones((1, 4), np.float32)
    >>> acc, top, total = codebook_attention_reference(
    ...     q, packed, ones, centroids, 1, np.zeros((1, 1, 1), np.float32),
    ...     packed, ones, centroids, 1, 8, 4, 1.0)
    >>> float(top[0, 0, 0]), round(float(total[0, 0, 0]), 4)    # logits 0, 8, 0, 0
    (8.0, 1.001)
    >>> round(float(acc[0, 0, 0, 0] / total[0, 0, 0]), 4)     # the weight of token 1
    0.999
    """
    key_bits, value_bits, dim, block, heads, blocks, _, scale = check_attention_arguments(
        q_key, key_packed, key_factor, key_centroids, key_bits, key_offset, value_packed,
        value_factor, value_centroids, value_bits, dim, block, scale)
    xp = array_module(q_key)
    tokens = blocks * block
    k_hat = codebook_dequantize_reference(key_packed.reshape(heads * tokens, -1), key_centroids,
                                          key_bits, dim).reshape(heads, blocks, block, dim)
    dots = q_key @ xp.swapaxes(k_hat, -1, -2)                                 # (H, b, m, block)
    factor = key_factor.astype(xp.float32).reshape(heads, blocks, 1, block)
    logits = (dots * factor + key_offset[..., None]) * xp.float32(scale)
    maximum = logits.max(axis=-1)
    weights = xp.exp(logits - maximum[..., None])
    v_hat = codebook_dequantize_reference(value_packed.reshape(heads * tokens, -1),
                                          value_centroids, value_bits, dim)
    v_hat = v_hat.reshape(heads, blocks, block, dim) * value_factor.astype(xp.float32).reshape(
        heads, blocks, block, 1)
    acc = weights @ v_hat
    return (acc.astype(xp.float32), maximum.astype(xp.float32),
            weights.sum(axis=-1).astype(xp.float32))


def _check_shape(array: Any, expected: tuple[int, ...], name: str, description: str) -> None:
    if tuple(int(s) for s in array.shape) != expected:
        raise ValueError(f"{name} must have shape {description} = {expected}, got "
                         f"{tuple(array.shape)}")


def check_attention_arguments(q_key: Any, key_packed: Any, key_factor: Any, key_centroids: Any,
                    key_bits: Any, key_offset: Any, value_packed: Any, value_factor: Any,
                    value_centroids: Any, value_bits: Any, dim: Any, block: Any,
                    scale: Any) -> tuple[int, int, int, int, int, int, int, float]:
    """Check the arguments of a ``codebook_attention`` from their shapes and dtypes only.

    Every backend (and `codebook_attention_reference`) runs this check first.

    Works on any arrays with ``shape``, ``ndim`` and ``dtype`` (NumPy or CuPy; the values are
    not read). Raises ``TypeError`` for a wrong dtype or a non-integer ``key_bits``,
    ``value_bits``, ``dim`` or ``block`` (or a non-real ``scale``), ``ValueError`` for a
    wrong shape or an integer out of range, each naming the argument.

    Returns
    -------
    tuple
        ``(key_bits, value_bits, dim, block, heads, blocks, m, scale)``: the checked
        integers, ``H``, the number of blocks ``N // block``, the queries per head ``m`` and
        ``scale`` as a float.

    Examples
    --------
    >>> import numpy as np
    >>> floats = lambda *shape: np.zeros(shape, np.float32)
    >>> packed = np.zeros((2, 8, 4), np.uint8)       # 2 heads, 8 tokens, 8 codes of 4 bits
    >>> check_attention_arguments(floats(2, 1, 3, 8), packed, floats(2, 8), floats(16), 4,
    ...                           floats(2, 2, 3), packed, floats(2, 8), floats(16), 4, 8, 4, 0.5)
    (4, 4, 8, 4, 2, 2, 3, 0.5)
    >>> check_attention_arguments(floats(2, 1, 3, 8), packed, floats(2, 8), floats(16), 4,
    ...                           floats(2, 2, 3), packed, floats(2, 8), floats(16), 9, 8, 4, 0.5)
    Traceback (most recent call last):
    ValueError: value_bits must be in [1, 8], got 9
    """
    key_bits = check_bits(key_bits, "key_bits")
    value_bits = check_bits(value_bits, "value_bits")
    dim = check_int(dim, "dim", 1)
    block = check_int(block, "block", 1)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__} {scale!r}")
    for array, name in ((key_packed, "key_packed"), (value_packed, "value_packed")):
        if np.dtype(array.dtype) != np.uint8:
            raise TypeError(f"{name} must be uint8 packed codes, got dtype {array.dtype}")
    for array, name in ((q_key, "q_key"), (key_factor, "key_factor"),
                        (key_centroids, "key_centroids"), (key_offset, "key_offset"),
                        (value_factor, "value_factor"), (value_centroids, "value_centroids")):
        if np.dtype(array.dtype).kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {array.dtype}")
    if key_packed.ndim != 3:
        raise ValueError(f"key_packed must be 3-D (H, N, ceil(dim * key_bits / 8)), got shape "
                         f"{tuple(key_packed.shape)}")
    heads, tokens = int(key_packed.shape[0]), int(key_packed.shape[1])
    if tokens % block:
        raise ValueError(f"key_packed must hold a multiple of block = {block} tokens, got "
                         f"{tokens}")
    blocks = tokens // block
    _check_shape(key_packed, (heads, tokens, packed_length(dim, key_bits)), "key_packed",
                 "(H, N, ceil(dim * key_bits / 8))")
    _check_shape(value_packed, (heads, tokens, packed_length(dim, value_bits)), "value_packed",
                 "(H, N, ceil(dim * value_bits / 8))")
    _check_shape(key_factor, (heads, tokens), "key_factor", "(H, N)")
    _check_shape(value_factor, (heads, tokens), "value_factor", "(H, N)")
    _check_shape(key_centroids, (1 << key_bits,), "key_centroids", "(2**key_bits,)")
    _check_shape(value_centroids, (1 << value_bits,), "value_centroids", "(2**value_bits,)")
    if (q_key.ndim != 4 or int(q_key.shape[0]) != heads
            or int(q_key.shape[1]) not in (1, blocks) or int(q_key.shape[3]) != dim):
        raise ValueError(f"q_key must have shape (H, 1 or blocks, m, dim) with H = {heads}, "
                         f"blocks = {blocks}, dim = {dim}, got {tuple(q_key.shape)}")
    m = int(q_key.shape[2])
    if (key_offset.ndim != 3 or int(key_offset.shape[0]) != heads
            or int(key_offset.shape[1]) not in (1, blocks) or int(key_offset.shape[2]) != m):
        raise ValueError(f"key_offset must have shape (H, 1 or blocks, m) with H = {heads}, "
                         f"blocks = {blocks}, m = {m}, got {tuple(key_offset.shape)}")
    return key_bits, value_bits, dim, block, heads, blocks, m, float(scale)


def attention_workspace(xp: Any, q_key: Any, key_packed: Any, key_factor: Any,
                        key_centroids: Any, key_bits: Any, key_offset: Any, value_packed: Any,
                        value_factor: Any, value_centroids: Any, value_bits: Any, dim: Any,
                        block: Any, scale: Any) -> tuple[tuple, tuple, tuple]:
    """What every ``codebook_attention`` kernel starts with, in the array module ``xp``.

    The arguments are checked (`check_attention_arguments`), the arrays moved to ``xp`` and
    made C-contiguous (float32; the packed codes uint8), and the outputs allocated.

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy``: where the arrays and outputs live.
    q_key, key_packed, key_factor, key_centroids, key_bits, key_offset : array or int
        As in `codebook_attention_reference` (float arrays of any float dtype).
    value_packed, value_factor, value_centroids, value_bits, dim, block, scale : array or number
        As in `codebook_attention_reference`.

    Returns
    -------
    arrays : tuple
        ``(q_key, key_packed, key_factor, key_centroids, key_offset, value_packed,
        value_factor, value_centroids)``.
    sizes : tuple
        ``(key_bits, value_bits, dim, block, heads, blocks, m, scale)``.
    outputs : tuple
        Uninitialised float32 ``acc (H, blocks, m, dim)``, ``maximum`` and ``total
        (H, blocks, m)``.

    Examples
    --------
    >>> import numpy as np
    >>> floats = lambda *shape: np.zeros(shape, np.float64)       # float64: made float32
    >>> packed = np.zeros((2, 8, 4), np.uint8)       # 2 heads, 8 tokens, 8 codes of 4 bits
    >>> arrays, sizes, outputs = attention_workspace(
    ...     np, floats(2, 1, 3, 8), packed, floats(2, 8), floats(16), 4, floats(2, 2, 3),
    ...     packed, floats(2, 8), floats(16), 4, 8, 4, 0.5)
    >>> sizes
    (4, 4, 8, 4, 2, 2, 3, 0.5)
    >>> [a.dtype.name for a in arrays[:3]], all(a.flags.c_contiguous for a in arrays)
    (['float32', 'uint8', 'float32'], True)
    >>> [o.shape for o in outputs]
    [(2, 2, 3, 8), (2, 2, 3), (2, 2, 3)]
    """
    arrays = [xp.asarray(x) for x in (q_key, key_packed, key_factor, key_centroids, key_offset,
                                      value_packed, value_factor, value_centroids)]
    sizes = check_attention_arguments(arrays[0], arrays[1], arrays[2], arrays[3], key_bits,
                                      arrays[4], arrays[5], arrays[6], arrays[7], value_bits,
                                      dim, block, scale)
    _, _, dim, _, heads, blocks, m, _ = sizes
    packed = (1, 5)
    arrays = tuple(xp.ascontiguousarray(x, dtype=xp.uint8 if i in packed else xp.float32)
                   for i, x in enumerate(arrays))
    outputs = (xp.empty((heads, blocks, m, dim), dtype=xp.float32),
               xp.empty((heads, blocks, m), dtype=xp.float32),
               xp.empty((heads, blocks, m), dtype=xp.float32))
    return arrays, sizes, outputs


def combine_partials(maximum: Any, total: Any, axis: int = -1) -> Any:
    """Each partial's weight in the softmax over all of them.

    Partials ``(max_b, sum_b)`` along ``axis`` of the same queries combine to the exact softmax:
    ``weight_b = exp(max_b - M) / sum_c exp(max_c - M) sum_c``, ``M = max_c max_c``, so that
    ``output = sum_b weight_b acc_b``. Returns float32 weights of ``maximum``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> combine_partials(np.array([0.0, 0.0], np.float32), np.array([1.0, 3.0], np.float32))
    array([0.25, 0.25], dtype=float32)
    """
    xp = array_module(maximum)
    top = maximum.max(axis=axis, keepdims=True)
    scaled = xp.exp(maximum - top)
    return (scaled / (scaled * total).sum(axis=axis, keepdims=True)).astype(xp.float32)

"""GPU production path of codebook attention: the CuPy ``RawModule`` kernel of
``cuda_kernels/attention.cu``.

`codebook_attention` launches ``codebook_attention<KEY_BITS, VALUE_BITS, QUERY_TILE>``: one
thread block per (head, block) pair computes that pair's split-softmax partial (the comment
at the top of the ``.cu`` file gives the work split). The (key bits, value bits) pairs of
`latkv._gpu.cuda_sources.ATTENTION_BIT_PAIRS` have their widths as template parameters; every
other pair of 1..8 runs the runtime-width instantiation ``<0, 0, QUERY_TILE>``. The query tile
(1, 4 or 8 queries processed together) is picked from ``m``.

The NumPy reference is `latkv.attention.codebook_attention_reference`, with the same
signature; the partials equal it up to float32 rounding (sums in other orders, ``expf``).

Inputs are CuPy arrays on the current device (NumPy arrays are copied there; arrays that are
not C-contiguous float32 / uint8 are converted first); the results are new CuPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cuda_sources import ATTENTION_BIT_PAIRS
from latkv._gpu.cupy_modules import kernel
from latkv.attention import attention_workspace

# Threads per thread block: one thread per token of a chunk of the block (and at most
# ATTENTION_MAX_THREADS = 256 in attention.cu); blocks of at most SHORT_BLOCK tokens get
# SHORT_BLOCK_THREADS, so that fewer threads idle in the logit phase.
THREADS = 256
SHORT_BLOCK = 128
SHORT_BLOCK_THREADS = 128
# The kernel loops grid-stride over (head, block) pairs, so any grid is correct; this caps it.
MAX_BLOCKS = 2**31 - 1


def query_tile(m: int) -> int:
    """Queries the kernel processes together for ``m`` queries per head: 1, 4 or 8."""
    return 1 if m <= 1 else 4 if m <= 4 else 8


def kernel_name(key_bits: int, value_bits: int, m: int) -> str:
    """NVRTC name expression of the instantiation that serves these widths and ``m``.

    Examples
    --------
    >>> kernel_name(4, 4, 1), kernel_name(5, 7, 16)
    ('codebook_attention<4, 4, 1>', 'codebook_attention<0, 0, 8>')
    """
    if (key_bits, value_bits) not in ATTENTION_BIT_PAIRS:
        key_bits = value_bits = 0  # the runtime-width path
    return f"codebook_attention<{key_bits}, {value_bits}, {query_tile(m)}>"


def codebook_attention(q_key: Any, key_packed: Any, key_factor: Any, key_centroids: Any,
                       key_bits: int, key_offset: Any, value_packed: Any, value_factor: Any,
                       value_centroids: Any, value_bits: int, dim: int, block: int,
                       scale: float) -> tuple[Any, Any, Any]:
    """Split-softmax partials of attention over codebook-coded keys and values (CuPy kernel).

    The partials of `latkv.attention.codebook_attention_reference` (to float32 rounding),
    computed per (head, block) pair from the packed codes in one kernel, without decoding a
    key or a value to memory.

    Parameters
    ----------
    q_key : (H, 1 or blocks, m, dim) float cupy.ndarray
        ``m`` queries per head in the key quantizer's rotated domain, per block or shared by
        all blocks (a block axis of length 1). Cast to float32.
    key_packed : (H, N, ceil(dim * key_bits / 8)) uint8 cupy.ndarray
        Packed key codes (`latkv.pack_bits` layout; padding bits are ignored) of
        ``N = blocks * block`` tokens.
    key_factor : (H, N) float cupy.ndarray
        The per-key factor (TurboQuant's norm). Cast to float32.
    key_centroids : (2**key_bits,) float cupy.ndarray
        Cast to float32.
    key_bits : int
        Bits per key code, 1..8.
    key_offset : (H, 1 or blocks, m) float cupy.ndarray
        Added to each dot product of the block before ``scale``. Cast to float32.
    value_packed : (H, N, ceil(dim * value_bits / 8)) uint8 cupy.ndarray
    value_factor : (H, N) float cupy.ndarray
        Cast to float32.
    value_centroids : (2**value_bits,) float cupy.ndarray
        Cast to float32.
    value_bits : int
        Bits per value code, 1..8.
    dim : int
        Coordinates per key and value, >= 1.
    block : int
        Tokens per block, >= 1; ``N`` must be a multiple.
    scale : float
        Logit scale, applied in float32.

    Returns
    -------
    acc : (H, blocks, m, dim) float32 cupy.ndarray
        ``sum_n exp(s_n - max_b) * value_factor_n * value_centroids[value_codes_n]`` per block.
    maximum : (H, blocks, m) float32 cupy.ndarray
        The largest logit ``s_n`` of the block.
    total : (H, blocks, m) float32 cupy.ndarray
        ``sum_n exp(s_n - max_b)``.

    Raises
    ------
    TypeError
        A packed array that is not uint8, another array that is not float, a non-integer
        ``key_bits``, ``value_bits``, ``dim`` or ``block``, a non-real ``scale``.
    ValueError
        Bits outside 1..8, ``dim`` or ``block`` below 1, ``N`` not a multiple of ``block``, or
        a shape that does not match (the message names the argument and the expected shape).
    """
    import cupy

    arrays, sizes, (acc, maximum, total) = attention_workspace(
        cupy, q_key, key_packed, key_factor, key_centroids, key_bits, key_offset, value_packed,
        value_factor, value_centroids, value_bits, dim, block, scale)
    if maximum.size == 0:
        return acc, maximum, total
    (q_key, key_packed, key_factor, key_centroids, key_offset, value_packed, value_factor,
     value_centroids) = arrays
    key_bits, value_bits, dim, block, heads, blocks, m, scale = sizes
    threads = SHORT_BLOCK_THREADS if block <= SHORT_BLOCK else THREADS
    pairs = heads * blocks
    function = kernel("attention.cu", kernel_name(key_bits, value_bits, m))
    function(
        (min(pairs, MAX_BLOCKS),), (threads,),
        (q_key, key_packed, key_factor, key_centroids, key_offset, value_packed, value_factor,
         value_centroids, acc, maximum, total, np.int64(heads), np.int64(blocks),
         np.int64(block), np.int64(m), np.int64(dim), np.int64(q_key.shape[1]),
         np.int64(key_offset.shape[1]), np.float32(scale), np.int32(key_bits),
         np.int32(value_bits)),
    )
    return acc, maximum, total

"""CPU fast path of `latkv.attention.codebook_attention_reference`: numba, one task per block.

The work is split by (head, block) pair: each pair is one task of a ``prange`` loop, and it
produces that pair's whole partial (``acc``, ``max``, ``sum``), so tasks share nothing and
write disjoint slices of the outputs. Within a task, in three steps:

1. every token's key codes are decoded once (`latkv._cpu.codebook._decode_row`: eight codes
   per ``key_bits`` bytes read as one word; the padding bits of the last byte are never
   looked at) into a ``(dim,)`` buffer of centroid values, dotted with each of the ``m``
   queries in float32 (`latkv._cpu.codebook._dot`, SIMD partial sums), and turned into the
   logit ``(factor * dot + offset) * scale``, in float32 and in the reference's order of
   operations; the ``(m, block)`` logits stay in a buffer of the task;
2. per query, the maximum over the block, then the weights ``exp(logit - max)`` (written over
   the logits) and their float32 sum in token order;
3. every token's value codes are decoded once, scaled by the token's value factor
   (``centroid * factor``, as the reference scales its decoded values) and added, times each
   query's weight, to that query's ``(dim,)`` row of ``acc``, in token order, in float32.

Nothing but the logits and two ``(dim,)`` buffers is held per task, and no key or value is
written to memory decoded. The results agree with the reference to float32 rounding: its
matrix products (BLAS) and sums add in other orders, and NumPy's ``exp`` may differ from
LLVM's by an ulp. Small inputs run the serial clone of the kernel
(`latkv._cpu.serial.kernel_for`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.codebook import _decode_row, _dot
from latkv._cpu.serial import kernel_for
from latkv.attention import attention_workspace


@njit(error_model="numpy", cache=True)
def _attention_pair(q_key, key_packed, key_factor, key_centroids, key_bits, key_offset,
                    value_packed, value_factor, value_centroids, value_bits, scale,
                    acc, maximum, total, head, block_index):
    """The partial of one (head, block) pair (one task of `_codebook_attention`).

    The parallel kernel and its serial clone share this compiled function; its buffers are
    allocated here, so that LLVM knows that they alias nothing.
    """
    m = acc.shape[2]
    dim = acc.shape[3]
    block = key_packed.shape[1] // acc.shape[1]
    first_token = block_index * block
    queries = q_key[head, block_index if q_key.shape[1] > 1 else 0]          # (m, dim)
    offsets = key_offset[head, block_index if key_offset.shape[1] > 1 else 0]  # (m,)
    key_values = np.empty(dim, np.float32)
    value_values = np.empty(dim, np.float32)
    logits = np.empty((m, block), np.float32)
    for token in range(block):
        row = first_token + token
        _decode_row(key_packed[head, row], key_centroids, key_bits, key_values)
        factor = key_factor[head, row]
        for i in range(m):
            logits[i, token] = (_dot(queries[i], key_values) * factor + offsets[i]) * scale
    for i in range(m):
        weights = logits[i]
        top = weights[0]
        for token in range(1, block):
            top = max(top, weights[token])
        summed = np.float32(0.0)
        for token in range(block):
            weight = np.exp(weights[token] - top)
            weights[token] = weight
            summed += weight
        maximum[head, block_index, i] = top
        total[head, block_index, i] = summed
    out = acc[head, block_index]                                              # (m, dim)
    out[:] = 0
    for token in range(block):
        row = first_token + token
        _decode_row(value_packed[head, row], value_centroids, value_bits, value_values)
        factor = value_factor[head, row]
        for j in range(dim):
            value_values[j] = value_values[j] * factor
        for i in range(m):
            weight = logits[i, token]
            out_row = out[i]
            for j in range(dim):
                out_row[j] += weight * value_values[j]


@njit(parallel=True, cache=True, error_model="numpy")
def _codebook_attention(q_key, key_packed, key_factor, key_centroids, key_bits, key_offset,
                        value_packed, value_factor, value_centroids, value_bits, scale,
                        acc, maximum, total):
    """Kernel: the split-softmax partials ``acc (H, blocks, m, dim)``, ``maximum`` and
    ``total (H, blocks, m)``, one task per (head, block) pair."""
    heads = acc.shape[0]
    blocks = acc.shape[1]
    for pair in prange(heads * blocks):
        head = pair // blocks
        _attention_pair(q_key, key_packed, key_factor, key_centroids, key_bits, key_offset,
                        value_packed, value_factor, value_centroids, value_bits, scale,
                        acc, maximum, total, head, pair - head * blocks)


# ---------------------------------------------------------------- host side


def codebook_attention(q_key: np.ndarray, key_packed: np.ndarray, key_factor: np.ndarray,
                       key_centroids: np.ndarray, key_bits: int, key_offset: np.ndarray,
                       value_packed: np.ndarray, value_factor: np.ndarray,
                       value_centroids: np.ndarray, value_bits: int, dim: int, block: int,
                       scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split-softmax partials of attention over codebook-coded keys and values (numba backend).

    The same partials as `latkv.attention.codebook_attention_reference` (to float32
    rounding), computed per (head, block) from the packed codes without decoding keys or
    values to memory.

    Parameters
    ----------
    q_key : numpy.ndarray, shape (H, 1 or blocks, m, dim), float
        ``m`` queries per head in the key quantizer's rotated domain, per block or shared by
        all blocks (a block axis of length 1). Cast to float32.
    key_packed : numpy.ndarray, shape (H, N, ceil(dim * key_bits / 8)), uint8
        Packed key codes (`latkv.pack_bits` layout; padding bits are ignored) of
        ``N = blocks * block`` tokens.
    key_factor : numpy.ndarray, shape (H, N), float
        The per-key factor (TurboQuant's norm). Cast to float32.
    key_centroids : numpy.ndarray, shape (2**key_bits,), float
        Cast to float32.
    key_bits : int
        Bits per key code, 1..8.
    key_offset : numpy.ndarray, shape (H, 1 or blocks, m), float
        Added to each dot product of the block before ``scale``. Cast to float32.
    value_packed : numpy.ndarray, shape (H, N, ceil(dim * value_bits / 8)), uint8
    value_factor : numpy.ndarray, shape (H, N), float
        Cast to float32.
    value_centroids : numpy.ndarray, shape (2**value_bits,), float
        Cast to float32.
    value_bits : int
        Bits per value code, 1..8.
    dim : int
        Coordinates per key and value.
    block : int
        Tokens per block; ``N`` must be a multiple.
    scale : float
        Logit scale, applied in float32.

    Returns
    -------
    acc : numpy.ndarray, shape (H, blocks, m, dim), float32
        ``sum_n exp(s_n - max_b) * value_factor_n * value_centroids[value_codes_n]`` per block.
    maximum : numpy.ndarray, shape (H, blocks, m), float32
        The largest logit ``s_n`` of the block.
    total : numpy.ndarray, shape (H, blocks, m), float32
        ``sum_n exp(s_n - max_b)``.

    Examples
    --------
    The reference's partials, from 3-bit keys and 2-bit values of 2 heads, 3 blocks of 16:

    >>> import numpy as np
    >>> from latkv.attention import codebook_attention_reference
    >>> from latkv.packing import pack_bits
    >>> rng = np.random.default_rng(0)
    >>> keys = pack_bits(rng.integers(0, 8, (2, 48, 64)).astype(np.uint8), 3)
    >>> values = pack_bits(rng.integers(0, 4, (2, 48, 64)).astype(np.uint8), 2)
    >>> factor = rng.random((2, 48)).astype(np.float32)
    >>> q = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    >>> arguments = (q, keys, factor, np.linspace(-1, 1, 8, dtype=np.float32), 3,
    ...              np.zeros((2, 3, 4), np.float32), values, factor,
    ...              np.linspace(-1, 1, 4, dtype=np.float32), 2, 64, 16, 0.125)
    >>> fast, reference = codebook_attention(*arguments), codebook_attention_reference(*arguments)
    >>> all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(fast, reference))
    True
    """
    arrays, sizes, (acc, maximum, total) = attention_workspace(
        np, q_key, key_packed, key_factor, key_centroids, key_bits, key_offset, value_packed,
        value_factor, value_centroids, value_bits, dim, block, scale)
    if maximum.size == 0:
        return acc, maximum, total
    (q_key, key_packed, key_factor, key_centroids, key_offset, value_packed, value_factor,
     value_centroids) = arrays
    key_bits, value_bits, _, block, _, _, _, scale = sizes
    kernel = kernel_for(_codebook_attention, acc.size * block)
    kernel(q_key, key_packed, key_factor, key_centroids, key_bits, key_offset, value_packed,
           value_factor, value_centroids, value_bits, np.float32(scale), acc, maximum, total)
    return acc, maximum, total

"""numba.cuda kernel of `latkv.attention.codebook_attention_reference`: one CUDA block per
(head, block) pair.

Work split: the grid runs over (head, block) pairs (grid-stride, so any grid size is correct),
and the threads of a CUDA block share a pair: `threads_for` gives a power of two from a warp
to `MAX_THREADS`, the nearest above the tokens of a block. The key and value centroids are
copied to shared memory first. The block's tokens are taken in tiles of one token per thread
and its queries in groups of up to `TILE_QUERIES`; for each group of queries:

1. *logits*: each thread decodes the key codes of its token once (`_code_at`, from the packed
   bytes, so padding bits are never read) and accumulates the dot products with every query
   of the group in float32, in order of the coordinates, in a per-thread local array; the
   logit ``(dot * factor + offset) * scale`` is computed in the reference's order of
   operations and written to a shared ``(TILE_QUERIES, MAX_THREADS)`` tile. Each thread keeps
   the running maximum of its tokens;
2. *maximum*: a shared-memory tree reduction over the threads, for all queries at once;
3. *weights and values*: per tile (the logits computed again when the block has more than
   one tile), each thread replaces its token's logits by ``exp(logit - max)`` and adds them to
   its running sums; then the threads go over the ``dim`` coordinates: for coordinate ``j``
   a thread decodes the value code ``j`` of each token of the tile, scales the centroid by
   the token's value factor (``centroid * factor``, as the reference) and accumulates the
   weighted values for every query in float32, in token order, adding the tile's sums to
   ``acc`` (each coordinate of ``acc`` has one owner thread, so no atomics);
4. *total*: a tree reduction of the per-thread sums.

The sums run in other orders than the reference's matrix products, and CUDA's ``expf``
differs from NumPy's ``exp`` by an ulp or so: the partials agree with the reference to float32
rounding. NumPy inputs are copied to the device and back (how the kernel runs in the CUDA
simulator, ``NUMBA_ENABLE_CUDASIM=1``) and give NumPy results; CuPy inputs (or anything else
exposing ``__cuda_array_interface__``) stay on the device, run on CuPy's current stream and
give CuPy results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# numba.cuda must be a module global: the CUDA simulator swaps the kernel's global ``cuda``.
from numba import cuda, float32

from latkv._gpu.numba_codebook import MAX_LEVELS, _code_at
from latkv._gpu.numba_launch import MAX_BLOCKS, THREADS_PER_BLOCK, DeviceArrays
from latkv.attention import attention_workspace

#: most threads of a CUDA block (a power of two); a tile has one token per thread
MAX_THREADS = THREADS_PER_BLOCK
#: fewest threads of a CUDA block: a warp
MIN_THREADS = 32
#: queries whose logits are held at once (in shared memory and per-thread local arrays)
TILE_QUERIES = 8
#: shared-memory floats per array of a tile: one module constant, since numba.cuda sizes a
#: shared array only from a compile-time constant, not from an expression (the simulator
#: accepts either; a device compile does not)
TILE_ELEMENTS = TILE_QUERIES * MAX_THREADS


def threads_for(block: int) -> int:
    """Threads of a CUDA block for ``block`` tokens: the power of two from `MIN_THREADS` to
    `MAX_THREADS` nearest above ``block`` (a block of 16 tokens leaves no 112 threads idle)."""
    threads = MIN_THREADS
    while threads < min(block, MAX_THREADS):
        threads *= 2
    return threads


@cuda.jit(device=True)
def _tile_logits(q_key, key_packed, key_factor, key_levels, key_offset, key_bits, scale,
                 head, query_block, offset_block, first_query, count, row, logits, dots,
                 thread):
    """Logits of token ``row`` of ``head`` for queries ``first_query .. + count`` into
    column ``thread`` of the shared tile ``logits``; ``dots`` is the thread's local array."""
    dim = q_key.shape[3]
    key_codes = key_packed[head, row]
    for i in range(count):
        dots[i] = float32(0.0)
    for j in range(dim):
        level = key_levels[_code_at(key_codes, j, key_bits)]
        for i in range(count):
            dots[i] += q_key[head, query_block, first_query + i, j] * level
    factor = key_factor[head, row]
    for i in range(count):
        logits[i * MAX_THREADS + thread] = (
            dots[i] * factor + key_offset[head, offset_block, first_query + i]) * scale


@cuda.jit(device=True)
def _reduce(scratch, count, thread, threads, maximum):
    """``scratch[i * MAX_THREADS]`` = the maximum (or the sum) of ``scratch[i * MAX_THREADS:
    i * MAX_THREADS + threads]`` for ``i < count``: one tree over the threads (``threads`` a
    power of two) for all queries at once. Every thread of the block must call it; it starts
    and ends synchronised."""
    cuda.syncthreads()
    step = threads // 2
    while step > 0:
        if thread < step:
            for i in range(count):
                here = i * MAX_THREADS + thread
                if maximum:
                    scratch[here] = max(scratch[here], scratch[here + step])
                else:
                    scratch[here] = scratch[here] + scratch[here + step]
        cuda.syncthreads()
        step //= 2


@cuda.jit
def _attention_kernel(q_key, key_packed, key_factor, key_centroids, key_offset, value_packed,
                      value_factor, value_centroids, acc, maximum, total, key_bits,
                      value_bits, scale):
    key_levels = cuda.shared.array(MAX_LEVELS, float32)
    value_levels = cuda.shared.array(MAX_LEVELS, float32)
    logits = cuda.shared.array(TILE_ELEMENTS, float32)   # then the weights
    scratch = cuda.shared.array(TILE_ELEMENTS, float32)
    dots = cuda.local.array(TILE_QUERIES, float32)       # dot products, then value sums
    running = cuda.local.array(TILE_QUERIES, float32)    # the thread's maximum, then sum
    thread = cuda.threadIdx.x
    threads = cuda.blockDim.x                            # tokens of a tile
    for i in range(thread, 1 << key_bits, threads):
        key_levels[i] = key_centroids[i]
    for i in range(thread, 1 << value_bits, threads):
        value_levels[i] = value_centroids[i]
    heads = acc.shape[0]
    blocks = acc.shape[1]
    m = acc.shape[2]
    dim = acc.shape[3]
    block = key_packed.shape[1] // blocks
    tiles = (block + threads - 1) // threads
    pair = cuda.blockIdx.x
    while pair < heads * blocks:    # the same for every thread of the block
        head = pair // blocks
        block_index = pair - head * blocks
        query_block = block_index if q_key.shape[1] > 1 else 0
        offset_block = block_index if key_offset.shape[1] > 1 else 0
        first_token = block_index * block
        for first_query in range(0, m, TILE_QUERIES):
            count = min(TILE_QUERIES, m - first_query)
            # 1. logits and each thread's maximum
            for i in range(count):
                running[i] = -math.inf
            cuda.syncthreads()    # the levels are loaded, the last group's tiles read
            for tile in range(tiles):
                token = tile * threads + thread
                if token < block:
                    _tile_logits(q_key, key_packed, key_factor, key_levels, key_offset,
                                 key_bits, scale, head, query_block, offset_block,
                                 first_query, count, first_token + token, logits, dots,
                                 thread)
                    for i in range(count):
                        running[i] = max(running[i], logits[i * MAX_THREADS + thread])
            # 2. the block's maximum per query, in scratch[i * MAX_THREADS]
            for i in range(count):
                scratch[i * MAX_THREADS + thread] = running[i]
                running[i] = float32(0.0)
            _reduce(scratch, count, thread, threads, True)
            # 3. weights, their sums and the weighted values, tile by tile
            for tile in range(tiles):
                token = tile * threads + thread
                if token < block:
                    if tiles > 1:     # the tile's logits were overwritten: compute them again
                        _tile_logits(q_key, key_packed, key_factor, key_levels, key_offset,
                                     key_bits, scale, head, query_block, offset_block,
                                     first_query, count, first_token + token, logits, dots,
                                     thread)
                    for i in range(count):
                        here = i * MAX_THREADS + thread
                        weight = math.exp(logits[here] - scratch[i * MAX_THREADS])
                        logits[here] = weight
                        running[i] += weight
                cuda.syncthreads()
                tile_tokens = min(threads, block - tile * threads)
                for j in range(thread, dim, threads):
                    for i in range(count):
                        dots[i] = float32(0.0)
                    for t in range(tile_tokens):
                        row = first_token + tile * threads + t
                        value = (value_levels[_code_at(value_packed[head, row], j, value_bits)]
                                 * value_factor[head, row])
                        for i in range(count):
                            dots[i] += logits[i * MAX_THREADS + t] * value
                    for i in range(count):
                        if tile == 0:
                            acc[head, block_index, first_query + i, j] = dots[i]
                        else:
                            acc[head, block_index, first_query + i, j] += dots[i]
                cuda.syncthreads()     # the tile is read before the next one is written
            # 4. the block's sum per query
            if thread == 0:
                for i in range(count):
                    maximum[head, block_index, first_query + i] = scratch[i * MAX_THREADS]
            cuda.syncthreads()         # the maxima are read before scratch is overwritten
            for i in range(count):
                scratch[i * MAX_THREADS + thread] = running[i]
            _reduce(scratch, count, thread, threads, False)
            if thread == 0:
                for i in range(count):
                    total[head, block_index, first_query + i] = scratch[i * MAX_THREADS]
        pair += cuda.gridDim.x


# ---------------------------------------------------------------- host side


def codebook_attention(q_key: Any, key_packed: Any, key_factor: Any, key_centroids: Any,
                       key_bits: int, key_offset: Any, value_packed: Any, value_factor: Any,
                       value_centroids: Any, value_bits: int, dim: int, block: int,
                       scale: float) -> tuple[Any, Any, Any]:
    """Split-softmax partials of attention over codebook-coded keys and values (numba.cuda).

    The same partials as `latkv.attention.codebook_attention_reference` (to float32
    rounding), one CUDA block per (head, block) pair.

    Parameters
    ----------
    q_key : (H, 1 or blocks, m, dim) float, NumPy or on the GPU (CuPy or
        ``__cuda_array_interface__``)
        Queries in the key quantizer's rotated domain, per block or shared by all blocks.
        Cast to float32.
    key_packed : (H, N, ceil(dim * key_bits / 8)) uint8
        Packed key codes (`latkv.pack_bits` layout; padding bits are ignored),
        ``N = blocks * block``.
    key_factor : (H, N) float
    key_centroids : (2**key_bits,) float
    key_bits : int
        1..8.
    key_offset : (H, 1 or blocks, m) float
        Added to each dot product before ``scale``.
    value_packed : (H, N, ceil(dim * value_bits / 8)) uint8
    value_factor : (H, N) float
    value_centroids : (2**value_bits,) float
    value_bits : int
        1..8.
    dim : int
    block : int
        Tokens per block; ``N`` must be a multiple.
    scale : float
        Logit scale, applied in float32.

    Returns
    -------
    acc : (H, blocks, m, dim) float32
    maximum : (H, blocks, m) float32
    total : (H, blocks, m) float32
        NumPy for NumPy input (copied to the device and back), else CuPy: the partials of
        `latkv.attention.codebook_attention_reference`.
    """
    arrays = DeviceArrays(q_key)
    inputs, sizes, (acc, maximum, total) = attention_workspace(
        arrays.xp, q_key, key_packed, key_factor, key_centroids, key_bits, key_offset,
        value_packed, value_factor, value_centroids, value_bits, dim, block, scale)
    if maximum.size == 0:
        return acc, maximum, total
    key_bits, value_bits, _, block, heads, blocks, _, scale = sizes
    arrays.launch(_attention_kernel, min(heads * blocks, MAX_BLOCKS), inputs,
                  (acc, maximum, total), (key_bits, value_bits, np.float32(scale)),
                  threads=threads_for(block))
    return acc, maximum, total

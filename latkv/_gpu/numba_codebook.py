"""Second GPU implementation of the codebook and sign-sketch kernels: numba.cuda kernels.

Same operations, same results as ``cuda_kernels/codebook.cu`` and
``cuda_kernels/sign_sketch.cu`` (references: `latkv.turbo.codebook_quantize_reference`,
`latkv.turbo.codebook_dequantize_reference`, `latkv.turbo.codebook_scores_reference`,
`latkv.qjl.sign_scores_reference`), with a simpler work split:

``codebook_quantize``
    One thread per packed output byte: it finds the codes of the (at most 8) coordinates whose
    bits fall into its byte, each by a binary search over the boundaries (kept in shared
    memory), and writes the byte once. ``u = rotated / norm`` is an IEEE float32 division
    (numba.cuda compiles ``/`` to ``div.rn.f32`` unless fastmath is on, and it is not), so the
    bytes equal the reference's.
``codebook_dequantize``
    One thread per output coordinate: the code is read from the one or two bytes it spans,
    the centroid from shared memory.
``codebook_scores`` / ``sign_scores``
    One thread per (batch, key), looping over the queries and, for each, over the coordinates
    (decoding the key's codes again per query; the queries of decoding are few). The writes of
    a query row are coalesced. Sums run in float32 in order of the coordinates.

``bits`` is a kernel argument, so one compiled kernel serves every width. Codes are decoded
with small integer arithmetic only (no 64-bit words), so the kernels run unchanged in the CUDA
simulator. NumPy inputs are copied to the device and back (this is how the kernels run in
the simulator, ``NUMBA_ENABLE_CUDASIM=1``) and give NumPy results; CuPy inputs (or anything
else exposing ``__cuda_array_interface__``) stay on the device, run on CuPy's current stream
and give CuPy results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# numba.cuda must be a module global: the CUDA simulator swaps the kernel's global ``cuda``.
from numba import cuda, float32

from latkv._gpu.kernel_arguments import check_bits, check_length, scores_shapes
from latkv._gpu.numba_launch import DeviceArrays, grid_blocks
from latkv.packing import packed_length

# Shared-memory table of centroids / boundaries: 2**8 entries covers every width.
MAX_LEVELS = 256


@cuda.jit(device=True)
def _cell(u, edges, bits):
    """``#{edges[i] < u}`` over the ``2**bits - 1`` increasing edges; NaN -> last cell."""
    if math.isnan(u):
        return (1 << bits) - 1
    code = 0
    step = 1 << (bits - 1)
    while step > 0:
        if edges[code + step - 1] < u:  # code + step - 1 <= 2**bits - 2
            code += step
        step >>= 1
    return code


@cuda.jit(device=True)
def _code_at(row_bytes, j, bits):
    """Code ``j`` of a packed row: bits ``j*bits .. j*bits + bits - 1``, LSB-first."""
    bit = j * bits
    byte = bit >> 3
    shift = bit & 7
    value = int(row_bytes[byte]) >> shift
    if shift + bits > 8:  # the code continues in the next byte
        value |= int(row_bytes[byte + 1]) << (8 - shift)
    return value & ((1 << bits) - 1)


@cuda.jit
def _quantize_kernel(rotated, norm, boundaries, packed, bits):
    edges = cuda.shared.array(MAX_LEVELS, float32)
    for i in range(cuda.threadIdx.x, (1 << bits) - 1, cuda.blockDim.x):
        edges[i] = boundaries[i]
    cuda.syncthreads()
    rows = rotated.shape[0]
    dim = rotated.shape[1]
    width = packed.shape[1]
    total = rows * width
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // width
        byte = index - row * width
        scale = norm[row]
        if not scale > 0:  # zero (or NaN) norm: divide by 1
            scale = float32(1.0)
        first_bit = byte * 8
        first = first_bit // bits
        last = min((first_bit + 7) // bits, dim - 1)
        value = 0
        for j in range(first, last + 1):
            code = _cell(rotated[row, j] / scale, edges, bits)
            offset = j * bits - first_bit  # where the code starts relative to this byte
            if offset >= 0:
                value |= code << offset
            else:
                value |= code >> (-offset)
        packed[row, byte] = value & 0xFF
        index += stride


@cuda.jit
def _dequantize_kernel(packed, centroids, out, bits):
    levels = cuda.shared.array(MAX_LEVELS, float32)
    for i in range(cuda.threadIdx.x, 1 << bits, cuda.blockDim.x):
        levels[i] = centroids[i]
    cuda.syncthreads()
    rows = out.shape[0]
    dim = out.shape[1]
    total = rows * dim
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // dim
        j = index - row * dim
        out[row, j] = levels[_code_at(packed[row], j, bits)]
        index += stride


@cuda.jit
def _scores_kernel(q, packed, centroids, out, bits):
    levels = cuda.shared.array(MAX_LEVELS, float32)
    for i in range(cuda.threadIdx.x, 1 << bits, cuda.blockDim.x):
        levels[i] = centroids[i]
    cuda.syncthreads()
    batches = q.shape[0]
    m = q.shape[1]
    dim = q.shape[2]
    n = packed.shape[1]
    total = batches * n
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        batch = index // n
        key = index - batch * n
        key_codes = packed[batch, key]
        for i in range(m):
            acc = float32(0.0)
            for j in range(dim):
                acc += q[batch, i, j] * levels[_code_at(key_codes, j, bits)]
            out[batch, i, key] = acc
        index += stride


@cuda.jit
def _sign_scores_kernel(q, packed, out):
    batches = q.shape[0]
    m = q.shape[1]
    rows = q.shape[2]
    n = packed.shape[1]
    total = batches * n
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        batch = index // n
        key = index - batch * n
        key_signs = packed[batch, key]
        for i in range(m):
            acc = float32(0.0)
            for j in range(rows):
                value = q[batch, i, j]
                if (int(key_signs[j >> 3]) >> (j & 7)) & 1:
                    acc += value
                else:
                    acc -= value
            out[batch, i, key] = acc
        index += stride


# ---------------------------------------------------------------- host side


def codebook_quantize(rotated: Any, norm: Any, boundaries: Any, bits: int) -> Any:
    """Packed codes of ``u = rotated / norm`` against a scalar codebook (numba.cuda kernel).

    Parameters
    ----------
    rotated : (n, d) float32, NumPy or on the GPU (CuPy or ``__cuda_array_interface__``)
    norm : (n,) float32
        A norm that is not ``> 0`` divides by 1 instead.
    boundaries : (2**bits - 1,) float32
        Increasing; the code of ``u`` is the number of boundaries strictly below it.
    bits : int
        1..8.

    Returns
    -------
    packed : (n, ceil(d * bits / 8)) uint8
        NumPy for NumPy input (copied to the device and back), else CuPy. Byte-identical to
        `latkv.turbo.codebook_quantize_reference`.
    """
    bits = check_bits(bits)
    arrays = DeviceArrays(rotated)
    rotated = arrays.put(rotated, np.float32)
    rows, dim = (int(s) for s in rotated.shape)
    norm = arrays.put(norm, np.float32)
    boundaries = arrays.put(boundaries, np.float32)
    check_length(norm, rows, "norm")
    check_length(boundaries, (1 << bits) - 1, "boundaries")
    packed = arrays.empty((rows, packed_length(dim, bits)), np.uint8)
    if packed.size == 0:
        return packed
    arrays.launch(_quantize_kernel, grid_blocks(packed.size), (rotated, norm, boundaries),
                  (packed,), (bits,))
    return packed


def codebook_dequantize(packed: Any, centroids: Any, bits: int, dim: int) -> Any:
    """``centroids[codes]`` from packed codes (numba.cuda kernel).

    Parameters
    ----------
    packed : (n, ceil(dim * bits / 8)) uint8, NumPy or on the GPU
        Padding bits of the last byte are ignored.
    centroids : (2**bits,) float32
    bits : int
        1..8.
    dim : int
        Codes per row.

    Returns
    -------
    (n, dim) float32
        NumPy for NumPy input, else CuPy. Equal to
        `latkv.turbo.codebook_dequantize_reference`.
    """
    bits = check_bits(bits)
    dim = int(dim)
    arrays = DeviceArrays(packed)
    packed = arrays.put(packed, np.uint8)
    centroids = arrays.put(centroids, np.float32)
    check_length(centroids, 1 << bits, "centroids")
    if packed.ndim != 2 or int(packed.shape[1]) != packed_length(dim, bits):
        raise ValueError(f"packed must have shape (n, {packed_length(dim, bits)}) for dim "
                         f"{dim} and {bits} bits, got {tuple(packed.shape)}")
    out = arrays.empty((int(packed.shape[0]), dim), np.float32)
    if out.size == 0:
        return out
    arrays.launch(_dequantize_kernel, grid_blocks(out.size), (packed, centroids), (out,),
                  (bits,))
    return out


def codebook_scores(q: Any, packed: Any, centroids: Any, bits: int, dim: int) -> Any:
    """``q @ centroids[codes].T`` per batch, from packed codes (numba.cuda kernel).

    Parameters
    ----------
    q : (B, m, dim) float32, NumPy or on the GPU
    packed : (B, n, ceil(dim * bits / 8)) uint8
    centroids : (2**bits,) float32
    bits : int
        1..8.
    dim : int

    Returns
    -------
    (B, m, n) float32
        NumPy for NumPy input, else CuPy. ``out[b, i, k] = sum_j q[b, i, j] *
        centroids[code[b, k, j]]`` in float32; equal to
        `latkv.turbo.codebook_scores_reference` up to rounding.
    """
    bits = check_bits(bits)
    dim = int(dim)
    arrays = DeviceArrays(q)
    q = arrays.put(q, np.float32)
    packed = arrays.put(packed, np.uint8)
    centroids = arrays.put(centroids, np.float32)
    check_length(centroids, 1 << bits, "centroids")
    batches, m, n = scores_shapes(q, packed, dim, packed_length(dim, bits))
    out = arrays.empty((batches, m, n), np.float32)
    if out.size == 0:
        return out
    arrays.launch(_scores_kernel, grid_blocks(batches * n), (q, packed, centroids), (out,),
                  (bits,))
    return out


def sign_scores(q: Any, packed: Any, rows: int) -> Any:
    """``<q, z>`` against packed sign sketches ``z = 2 * bit - 1`` (numba.cuda kernel).

    Parameters
    ----------
    q : (B, m, rows) float32, NumPy or on the GPU
    packed : (B, n, ceil(rows / 8)) uint8
        Sign bits, LSB-first; padding bits of the last byte are ignored.
    rows : int
        Sketch rows (signs per key).

    Returns
    -------
    (B, m, n) float32
        NumPy for NumPy input, else CuPy. Equal to `latkv.qjl.sign_scores_reference` up to
        rounding (float32 sums).
    """
    rows = int(rows)
    arrays = DeviceArrays(q)
    q = arrays.put(q, np.float32)
    packed = arrays.put(packed, np.uint8)
    batches, m, n = scores_shapes(q, packed, rows, packed_length(rows, 1))
    out = arrays.empty((batches, m, n), np.float32)
    if out.size == 0:
        return out
    arrays.launch(_sign_scores_kernel, grid_blocks(batches * n), (q, packed), (out,), ())
    return out

// Scalar-codebook quantization (TurboQuant's mse stage) on packed BITS-bit codes, BITS = 1..8.
//
// The NumPy references in latkv/turbo.py are the specification; the packed layout is that of
// latkv/packing.py (code j of a row occupies bits j*BITS .. j*BITS + BITS - 1 of the row, LSB
// first; a row of dim codes takes ceil(dim * BITS / 8) bytes; unused high bits of the last
// byte are 0 when written and ignored when read). Eight codes fill exactly BITS bytes.
//
//   template <int BITS>
//   __global__ void codebook_quantize(const float* rotated, const float* norm,
//                                     const float* boundaries, uint8* packed,
//                                     long long rows, long long dim)
//     rotated (rows, dim) float32, norm (rows,) float32, boundaries (2**BITS - 1,) float32
//     increasing, packed (rows, ceil(dim * BITS / 8)) uint8, written in full.
//     u = rotated[r, j] / s with s = norm[r] if norm[r] > 0 else 1 (an IEEE division,
//     __fdiv_rn, never a reciprocal multiply), code = #{boundaries < u} (NaN sorts last, as in
//     numpy.searchsorted: code 2**BITS - 1). Byte-identical to codebook_quantize_reference.
//     One thread per (row, group of 8 codes), grid-stride: the 8 codes are found by a branchless
//     binary search over the boundaries (in shared memory), gathered into a 64-bit word and
//     written as BITS bytes (fewer for the tail group of a row).
//
//   template <int BITS>
//   __global__ void codebook_dequantize(const uint8* packed, const float* centroids,
//                                       float* out, long long rows, long long dim)
//     packed (rows, ceil(dim * BITS / 8)) uint8, centroids (2**BITS,) float32, out (rows, dim)
//     float32 = centroids[codes], exact. One thread per (row, group of 8 codes), grid-stride.
//
//   template <int BITS>
//   __global__ void codebook_scores(const float* q, const uint8* packed,
//                                   const float* centroids, float* out, long long batches,
//                                   long long m, long long n, long long dim)
//     q (batches, m, dim) float32, packed (batches, n, ceil(dim * BITS / 8)) uint8,
//     out (batches, m, n) float32: out[b, i, k] = sum_j q[b, i, j] * centroids[code[b, k, j]],
//     summed in float32 in order of j (so it differs from a BLAS product by rounding only).
//     A block handles one (batch, tile of blockDim.x keys) per iteration of a grid-stride loop;
//     thread t owns key tile * blockDim.x + t. Queries are processed SCORES_QUERY_TILE at a
//     time, the query tile staged in shared memory SCORES_DIM_CHUNK coordinates at a time
//     (coalesced loads, broadcast reads); each thread decodes its key's codes one group of 8 at
//     a time and accumulates SCORES_QUERY_TILE dot products in registers; the writes of a query
//     row are coalesced (consecutive threads, consecutive keys). Any block size (the Python
//     side uses 128) and any grid size are correct: every thread of a block runs the same
//     loop iterations, so every thread reaches every __syncthreads.
//
// Rows, keys and offsets are 64-bit. C-contiguous arrays only. Compile without fast math
// (COMPILE_OPTIONS in latkv/_gpu/cuda_sources.py). Instantiated by NVRTC name expressions
// "codebook_quantize<BITS>", "codebook_dequantize<BITS>", "codebook_scores<BITS>".

typedef unsigned char uint8;
typedef unsigned long long uint64;

// Queries whose dot products a thread accumulates at once (registers per thread).
constexpr int SCORES_QUERY_TILE = 8;
// Query coordinates staged in shared memory at once; a multiple of 8 (whole code groups).
constexpr int SCORES_DIM_CHUNK = 256;
static_assert(SCORES_DIM_CHUNK % 8 == 0, "a chunk must hold whole groups of 8 codes");

// #{edges[i] < u} over the 2**BITS - 1 increasing edges: a branchless binary search (the
// predicate edges[i] < u is monotone in i), BITS steps. NaN goes to the last cell, where
// numpy.searchsorted puts it.
template <int BITS>
__device__ __forceinline__ unsigned int codebook_cell(float u, const float* edges) {
    if (isnan(u)) return (1u << BITS) - 1u;
    unsigned int code = 0;
#pragma unroll
    for (unsigned int step = 1u << (BITS - 1); step > 0; step >>= 1) {
        // code + step - 1 <= 2**BITS - 2: always an edge
        if (edges[code + step - 1] < u) code += step;
    }
    return code;
}

// Up to 8 packed codes (the group starting at bytes[0]), as the low 8 * BITS bits of a word;
// `length` bytes are read (BITS for a full group, fewer for the tail of a row).
__device__ __forceinline__ uint64 load_group(const uint8* bytes, int length) {
    uint64 word = 0;
    for (int k = 0; k < length; ++k) word |= (uint64)bytes[k] << (8 * k);
    return word;
}

template <int BITS>
__global__ void codebook_quantize(const float* __restrict__ rotated,
                                  const float* __restrict__ norm,
                                  const float* __restrict__ boundaries,
                                  uint8* __restrict__ packed, long long rows, long long dim) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    constexpr int LEVELS = 1 << BITS;
    __shared__ float edges[LEVELS - 1];
    for (int i = threadIdx.x; i < LEVELS - 1; i += blockDim.x) edges[i] = boundaries[i];
    __syncthreads();

    const long long packed_length = (dim * BITS + 7) / 8;
    const long long groups_per_row = (dim + 7) / 8;
    const long long total = rows * groups_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / groups_per_row;
        const long long group = index - row * groups_per_row;
        const float row_norm = norm[row];
        const float scale = row_norm > 0.0f ? row_norm : 1.0f;  // NaN norm -> 1, as reference
        const float* source = rotated + row * dim + group * 8;
        const long long remaining = dim - group * 8;
        const int count = remaining < 8 ? (int)remaining : 8;
        uint64 word = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (k < count) {
                const float u = __fdiv_rn(source[k], scale);  // IEEE division, not x * (1/s)
                word |= (uint64)codebook_cell<BITS>(u, edges) << (BITS * k);
            }
        }
        uint8* target = packed + row * packed_length + group * BITS;
        const int length = (count * BITS + 7) / 8;  // BITS for a full group
        for (int k = 0; k < length; ++k) target[k] = (uint8)(word >> (8 * k));
    }
}

template <int BITS>
__global__ void codebook_dequantize(const uint8* __restrict__ packed,
                                    const float* __restrict__ centroids,
                                    float* __restrict__ out, long long rows, long long dim) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    constexpr int LEVELS = 1 << BITS;
    constexpr uint64 CODE_MASK = (uint64)LEVELS - 1ull;
    __shared__ float levels[LEVELS];
    for (int i = threadIdx.x; i < LEVELS; i += blockDim.x) levels[i] = centroids[i];
    __syncthreads();

    const long long packed_length = (dim * BITS + 7) / 8;
    const long long groups_per_row = (dim + 7) / 8;
    const long long total = rows * groups_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / groups_per_row;
        const long long group = index - row * groups_per_row;
        const long long remaining = dim - group * 8;
        const int count = remaining < 8 ? (int)remaining : 8;
        const uint64 word =
            load_group(packed + row * packed_length + group * BITS, (count * BITS + 7) / 8);
        float* target = out + row * dim + group * 8;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (k < count) target[k] = levels[(word >> (BITS * k)) & CODE_MASK];
        }
    }
}

template <int BITS>
__global__ void codebook_scores(const float* __restrict__ q, const uint8* __restrict__ packed,
                                const float* __restrict__ centroids, float* __restrict__ out,
                                long long batches, long long m, long long n, long long dim) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    constexpr int LEVELS = 1 << BITS;
    constexpr uint64 CODE_MASK = (uint64)LEVELS - 1ull;
    __shared__ float levels[LEVELS];
    __shared__ float query_tile[SCORES_QUERY_TILE][SCORES_DIM_CHUNK];
    for (int i = threadIdx.x; i < LEVELS; i += blockDim.x) levels[i] = centroids[i];
    // (the first __syncthreads below publishes levels)

    const long long packed_length = (dim * BITS + 7) / 8;
    const long long key_tiles = (n + blockDim.x - 1) / blockDim.x;
    const long long items = batches * key_tiles;
    // item depends on the block only: all threads of a block iterate together
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const long long batch = item / key_tiles;
        const long long key = (item - batch * key_tiles) * blockDim.x + threadIdx.x;
        const bool valid = key < n;
        const uint8* key_codes = packed + (batch * n + (valid ? key : 0)) * packed_length;
        const float* batch_q = q + batch * m * dim;
        float* batch_out = out + batch * m * n;

        for (long long first_query = 0; first_query < m; first_query += SCORES_QUERY_TILE) {
            const long long queries_left = m - first_query;
            const int queries =
                queries_left < SCORES_QUERY_TILE ? (int)queries_left : SCORES_QUERY_TILE;
            float acc[SCORES_QUERY_TILE];
#pragma unroll
            for (int t = 0; t < SCORES_QUERY_TILE; ++t) acc[t] = 0.0f;

            for (long long chunk = 0; chunk < dim; chunk += SCORES_DIM_CHUNK) {
                const long long width_left = dim - chunk;
                const int width =
                    width_left < SCORES_DIM_CHUNK ? (int)width_left : SCORES_DIM_CHUNK;
                __syncthreads();  // the previous chunk is no longer read
                for (int e = threadIdx.x; e < SCORES_QUERY_TILE * SCORES_DIM_CHUNK;
                     e += blockDim.x) {
                    const int t = e / SCORES_DIM_CHUNK;
                    const int j = e - t * SCORES_DIM_CHUNK;
                    query_tile[t][j] = (t < queries && j < width)
                                           ? batch_q[(first_query + t) * dim + chunk + j]
                                           : 0.0f;
                }
                __syncthreads();
                if (valid) {
                    for (int g = 0; g < width; g += 8) {
                        const int count = width - g < 8 ? width - g : 8;
                        const uint64 word = load_group(
                            key_codes + ((chunk + g) / 8) * BITS, (count * BITS + 7) / 8);
#pragma unroll
                        for (int k = 0; k < 8; ++k) {
                            if (k < count) {
                                const float c = levels[(word >> (BITS * k)) & CODE_MASK];
#pragma unroll
                                for (int t = 0; t < SCORES_QUERY_TILE; ++t)
                                    acc[t] = fmaf(query_tile[t][g + k], c, acc[t]);
                            }
                        }
                    }
                }
            }
            if (valid) {
#pragma unroll
                for (int t = 0; t < SCORES_QUERY_TILE; ++t) {
                    if (t < queries) batch_out[(first_query + t) * n + key] = acc[t];
                }
            }
        }
    }
}

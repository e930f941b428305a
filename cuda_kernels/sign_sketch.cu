// QJL inner products against packed sign sketches (latkv/qjl.py, sign_scores_reference).
//
//   __global__ void sign_scores(const float* q, const uint8* packed, float* out,
//                               long long batches, long long m, long long n, long long rows)
//     q (batches, m, rows) float32, packed (batches, n, ceil(rows / 8)) uint8 sign bits
//     (bit j of a key, LSB-first as in latkv/packing.py, set = +1, clear = -1; padding bits
//     of the last byte ignored), out (batches, m, n) float32:
//         out[b, i, k] = sum_j q[b, i, j] * (2 * bit[b, k, j] - 1),
//     summed in float32 in order of j (each term is exact, +-q, so the result differs from a
//     BLAS product by the order of the additions only).
//
// Work split (as codebook_scores in codebook.cu): a block handles one (batch, tile of
// blockDim.x keys) per iteration of a grid-stride loop, thread t owning key
// tile * blockDim.x + t; queries are processed SIGN_QUERY_TILE at a time, staged in shared
// memory SIGN_DIM_CHUNK coordinates at a time; each thread reads its key's sign bytes one at a
// time and accumulates SIGN_QUERY_TILE sums in registers. Any block and grid size is correct;
// every thread of a block runs the same loop iterations and reaches every __syncthreads.
// Offsets are 64-bit. C-contiguous arrays only. Instantiated by the NVRTC name expression
// "sign_scores".

typedef unsigned char uint8;

// Queries whose sums a thread accumulates at once (registers per thread).
constexpr int SIGN_QUERY_TILE = 8;
// Query coordinates staged in shared memory at once; a multiple of 8 (whole sign bytes).
constexpr int SIGN_DIM_CHUNK = 256;
static_assert(SIGN_DIM_CHUNK % 8 == 0, "a chunk must hold whole bytes of signs");

__global__ void sign_scores(const float* __restrict__ q, const uint8* __restrict__ packed,
                            float* __restrict__ out, long long batches, long long m,
                            long long n, long long rows) {
    __shared__ float query_tile[SIGN_QUERY_TILE][SIGN_DIM_CHUNK];

    const long long packed_length = (rows + 7) / 8;
    const long long key_tiles = (n + blockDim.x - 1) / blockDim.x;
    const long long items = batches * key_tiles;
    // item depends on the block only: all threads of a block iterate together
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const long long batch = item / key_tiles;
        const long long key = (item - batch * key_tiles) * blockDim.x + threadIdx.x;
        const bool valid = key < n;
        const uint8* key_signs = packed + (batch * n + (valid ? key : 0)) * packed_length;
        const float* batch_q = q + batch * m * rows;
        float* batch_out = out + batch * m * n;

        for (long long first_query = 0; first_query < m; first_query += SIGN_QUERY_TILE) {
            const long long queries_left = m - first_query;
            const int queries =
                queries_left < SIGN_QUERY_TILE ? (int)queries_left : SIGN_QUERY_TILE;
            float acc[SIGN_QUERY_TILE];
#pragma unroll
            for (int t = 0; t < SIGN_QUERY_TILE; ++t) acc[t] = 0.0f;

            for (long long chunk = 0; chunk < rows; chunk += SIGN_DIM_CHUNK) {
                const long long width_left = rows - chunk;
                const int width = width_left < SIGN_DIM_CHUNK ? (int)width_left : SIGN_DIM_CHUNK;
                __syncthreads();  // the previous chunk is no longer read
                for (int e = threadIdx.x; e < SIGN_QUERY_TILE * SIGN_DIM_CHUNK;
                     e += blockDim.x) {
                    const int t = e / SIGN_DIM_CHUNK;
                    const int j = e - t * SIGN_DIM_CHUNK;
                    query_tile[t][j] = (t < queries && j < width)
                                           ? batch_q[(first_query + t) * rows + chunk + j]
                                           : 0.0f;
                }
                __syncthreads();
                if (valid) {
                    for (int g = 0; g < width; g += 8) {
                        const int count = width - g < 8 ? width - g : 8;
                        const unsigned int signs = key_signs[(chunk + g) / 8];
#pragma unroll
                        for (int k = 0; k < 8; ++k) {
                            if (k < count) {
                                const bool positive = (signs >> k) & 1u;
#pragma unroll
                                for (int t = 0; t < SIGN_QUERY_TILE; ++t) {
                                    const float value = query_tile[t][g + k];
                                    acc[t] += positive ? value : -value;
                                }
                            }
                        }
                    }
                }
            }
            if (valid) {
#pragma unroll
                for (int t = 0; t < SIGN_QUERY_TILE; ++t) {
                    if (t < queries) batch_out[(first_query + t) * n + key] = acc[t];
                }
            }
        }
    }
}

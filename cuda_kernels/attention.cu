// Attention over scalar-codebook codes in one pass: the split-softmax ("flash decoding")
// partials of latkv.attention.codebook_attention_reference (the specification), per
// (head, block) pair, from packed key and value codes (latkv/packing.py layout: code j of a
// row occupies bits j*BITS .. j*BITS + BITS - 1, LSB first; a row of dim codes takes
// ceil(dim * BITS / 8) bytes; padding bits of the last byte are ignored).
//
//   template <int KEY_BITS, int VALUE_BITS, int QUERY_TILE>
//   __global__ void codebook_attention(
//       const float* q_key, const uint8* key_packed, const float* key_factor,
//       const float* key_centroids, const float* key_offset, const uint8* value_packed,
//       const float* value_factor, const float* value_centroids, float* acc, float* maximum,
//       float* total, long long heads, long long blocks, long long block, long long m,
//       long long dim, long long query_blocks, long long offset_blocks, float scale,
//       int key_bits, int value_bits)
//     q_key (H, query_blocks, m, dim) float32, query_blocks 1 (shared by every block) or
//     blocks; key_packed (H, N, ceil(dim * key_bits / 8)) uint8 with N = blocks * block;
//     key_factor (H, N) float32; key_centroids (2**key_bits,) float32; key_offset
//     (H, offset_blocks, m) float32, offset_blocks 1 or blocks; value_packed
//     (H, N, ceil(dim * value_bits / 8)) uint8; value_factor (H, N) float32;
//     value_centroids (2**value_bits,) float32. Written in full: acc (H, blocks, m, dim),
//     maximum and total (H, blocks, m), float32. For the (head h, block b) pair and query i,
//     with the block's tokens n:
//       s_n      = ((dot(q_key[h, b or 0, i], key_centroids[key codes of n]) * key_factor_n)
//                   + key_offset[h, b or 0, i]) * scale       (each step rounded in float32)
//       maximum  = max_n s_n,   total = sum_n exp(s_n - maximum),
//       acc      = sum_n exp(s_n - maximum) * (value_centroids[value codes of n] * value_factor_n)
//     KEY_BITS / VALUE_BITS = 1..8 fix the widths at compile time (the runtime key_bits /
//     value_bits must then be equal to them); 0 reads the width from key_bits / value_bits
//     (1..8), the generic path for the pairs that are not instantiated. QUERY_TILE = 1, 2 or a
//     multiple of 4 (at most 8 are instantiated) is how many queries are processed together;
//     any m works (the queries are processed QUERY_TILE at a time).
//
// Work split. One thread block per (head, block) pair (a grid-stride loop over the pairs; a
// block's loop bound is the same for all its threads, so every thread reaches every
// __syncthreads). blockDim.x is a multiple of 32, at most ATTENTION_MAX_THREADS; any grid
// size is correct. Per pair, the queries are taken QUERY_TILE at a time, and the block's
// tokens CHUNK = blockDim.x at a time, with an online softmax across chunks (a running max
// and sum per query; the partial acc already written is rescaled by exp(old max - new max)).
// When block <= blockDim.x there is one chunk and no rescaling: the weights are
// exp(s_n - maximum), computed as the reference computes them. Per chunk, three phases:
//   1. logits: thread t owns token t of the chunk. The query tile is staged in shared memory
//      (transposed: [coordinate][query], ATTENTION_DIM_CHUNK coordinates at a time, read from
//      global memory coalesced; restaged per chunk only when dim > ATTENTION_DIM_CHUNK); the
//      thread decodes its key row one group of 8 codes at a time (one 2-, 4- or 8-byte load
//      when the width is a template parameter and the address allows it) and accumulates
//      QUERY_TILE dot products in registers (fmaf, in order of the coordinates; the query
//      values are broadcast reads of shared memory, float4 when QUERY_TILE % 4 == 0). The
//      logits go to shared memory, [token][query], with the token's value factor.
//   2. softmax statistics: warp w handles queries w, w + warps, ...: lanes over the chunk's
//      tokens, shuffle reductions of the max and of the sum; the logits are replaced by the
//      weights exp(s - new max) (expf, no fast math) in shared memory.
//   3. values: thread t handles the group of 8 coordinates t % G (G = min(ceil(dim / 8),
//      blockDim.x) groups at a time; more groups take more passes) of the tokens
//      t / G, t / G + S, ... of the chunk (S = blockDim.x / G token slices), so the threads
//      of a warp read consecutive bytes of one value row (coalesced). It accumulates
//      8 x QUERY_TILE sums in registers: v = centroid * value_factor (the reference's
//      rounding of the decoded value), then fmaf(weight, v, sum). The S slices are added in
//      shared memory, one query at a time (slice order, deterministic), and the thread owning
//      a coordinate writes acc (rescaling its own earlier write on later chunks).
// Shared memory (static; 13 KB for QUERY_TILE = 1, 28 KB for 8): the two centroid tables
// (256 floats each), the query tile (ATTENTION_DIM_CHUNK x QUERY_TILE floats), the weights
// (ATTENTION_MAX_THREADS x QUERY_TILE), the slice sums (ATTENTION_MAX_THREADS x 8), the
// chunk's value factors and the per-query running state. __launch_bounds__ asks for 4, 3 or 2
// resident thread blocks of 256 threads (QUERY_TILE 1, 4, 8), i.e. at most 64, 85 or 128
// registers per thread; the value sums of the 8-query tile take 64 of them.
//
// Results equal the reference to float32 rounding: the dot products and sums are added in
// other orders than NumPy's BLAS and pairwise sums, expf may differ from NumPy's exp by an
// ulp, and a block longer than blockDim.x rescales across chunks. Pairs, tokens and offsets
// are 64-bit. C-contiguous arrays only. Compile without fast math (COMPILE_OPTIONS in
// latkv/_gpu/cuda_sources.py). Instantiated by NVRTC name expressions
// "codebook_attention<KEY_BITS, VALUE_BITS, QUERY_TILE>".

typedef unsigned char uint8;
typedef unsigned short uint16;
typedef unsigned int uint32;
typedef unsigned long long uint64;

// Largest blockDim.x (and tokens per chunk).
constexpr int ATTENTION_MAX_THREADS = 256;
// Query coordinates staged in shared memory at once; a multiple of 8 (whole code groups).
constexpr int ATTENTION_DIM_CHUNK = 256;
// Largest centroid table (8 bits).
constexpr int ATTENTION_MAX_LEVELS = 256;
static_assert(ATTENTION_DIM_CHUNK % 8 == 0, "a chunk must hold whole groups of 8 codes");
static_assert(ATTENTION_MAX_THREADS % 32 == 0, "whole warps");

// The packed bytes of one group of up to 8 codes, as the low bits of a word: `length` bytes
// from `bytes` (BITS for a full group, fewer for the tail of a row). With the width known at
// compile time (BITS > 0), a full group at a suitably aligned address is read in 8-, 4- or
// 2-byte words; otherwise (and always for BITS = 0, the runtime width) byte by byte.
template <int BITS>
__device__ __forceinline__ uint64 load_code_group(const uint8* bytes, int length) {
    const uint64 address = (uint64)bytes;
    if constexpr (BITS == 8) {
        if (length == 8 && (address & 7ull) == 0)
            return *reinterpret_cast<const uint64*>(bytes);
    }
    if constexpr (BITS > 0 && BITS % 4 == 0) {
        if (length == BITS && (address & 3ull) == 0) {
            uint64 word = 0;
#pragma unroll
            for (int k = 0; k < BITS / 4; ++k)
                word |= (uint64)reinterpret_cast<const uint32*>(bytes)[k] << (32 * k);
            return word;
        }
    }
    if constexpr (BITS > 0 && BITS % 2 == 0) {
        if (length == BITS && (address & 1ull) == 0) {
            uint64 word = 0;
#pragma unroll
            for (int k = 0; k < BITS / 2; ++k)
                word |= (uint64)reinterpret_cast<const uint16*>(bytes)[k] << (16 * k);
            return word;
        }
    }
    uint64 word = 0;
    for (int k = 0; k < length; ++k) word |= (uint64)bytes[k] << (8 * k);
    return word;
}

// QUERY_TILE consecutive floats of shared memory (a row of the query tile or of the weights),
// as float4 loads when QUERY_TILE is a multiple of 4 (the rows are then 16-byte aligned).
template <int QUERY_TILE>
__device__ __forceinline__ void load_tile_row(const float* row, float (&out)[QUERY_TILE]) {
    if constexpr (QUERY_TILE % 4 == 0) {
#pragma unroll
        for (int r = 0; r < QUERY_TILE / 4; ++r) {
            const float4 v = reinterpret_cast<const float4*>(row)[r];
            out[4 * r] = v.x;
            out[4 * r + 1] = v.y;
            out[4 * r + 2] = v.z;
            out[4 * r + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int t = 0; t < QUERY_TILE; ++t) out[t] = row[t];
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Thread blocks of ATTENTION_MAX_THREADS threads resident per multiprocessor that the register
// allocation must allow: the one-query kernel is memory-bound (more warps hide the latency),
// the 8-query kernel needs its 64 value sums in registers (at most 128 per thread).
template <int QUERY_TILE>
constexpr int ATTENTION_MIN_BLOCKS = QUERY_TILE == 1 ? 4 : QUERY_TILE <= 4 ? 3 : 2;

template <int KEY_BITS, int VALUE_BITS, int QUERY_TILE>
__global__ void __launch_bounds__(ATTENTION_MAX_THREADS, ATTENTION_MIN_BLOCKS<QUERY_TILE>)
codebook_attention(
    const float* __restrict__ q_key, const uint8* __restrict__ key_packed,
    const float* __restrict__ key_factor, const float* __restrict__ key_centroids,
    const float* __restrict__ key_offset, const uint8* __restrict__ value_packed,
    const float* __restrict__ value_factor, const float* __restrict__ value_centroids,
    float* __restrict__ acc, float* __restrict__ maximum, float* __restrict__ total,
    long long heads, long long blocks, long long block, long long m, long long dim,
    long long query_blocks, long long offset_blocks, float scale, int runtime_key_bits,
    int runtime_value_bits) {
    static_assert(KEY_BITS >= 0 && KEY_BITS <= 8, "KEY_BITS must be 0 (runtime) or 1..8");
    static_assert(VALUE_BITS >= 0 && VALUE_BITS <= 8, "VALUE_BITS must be 0 (runtime) or 1..8");
    static_assert((QUERY_TILE == 1 || QUERY_TILE == 2 || QUERY_TILE % 4 == 0) &&
                      QUERY_TILE <= 32,
                  "QUERY_TILE must be 1, 2 or a multiple of 4, at most a warp");
    const int key_bits = KEY_BITS > 0 ? KEY_BITS : runtime_key_bits;
    const int value_bits = VALUE_BITS > 0 ? VALUE_BITS : runtime_value_bits;
    const uint64 key_mask = (1ull << key_bits) - 1ull;
    const uint64 value_mask = (1ull << value_bits) - 1ull;
    const float negative_infinity = __int_as_float((int)0xff800000u);

    __shared__ float key_levels[ATTENTION_MAX_LEVELS];
    __shared__ float value_levels[ATTENTION_MAX_LEVELS];
    // [coordinate][query] of the staged coordinates of the query tile
    alignas(16) __shared__ float query_tile[ATTENTION_DIM_CHUNK * QUERY_TILE];
    // [token][query]: the chunk's logits, then its weights
    alignas(16) __shared__ float weights[ATTENTION_MAX_THREADS * QUERY_TILE];
    // [slice][coordinate of the pass]: the value sums of one query, to be added over slices
    alignas(16) __shared__ float slice_sums[ATTENTION_MAX_THREADS * 8];
    __shared__ float chunk_value_factor[ATTENTION_MAX_THREADS];
    __shared__ float tile_offset[QUERY_TILE];
    __shared__ float running_max[QUERY_TILE];
    __shared__ float running_total[QUERY_TILE];
    __shared__ float rescale[QUERY_TILE];

    const int thread = threadIdx.x;
    const int threads = blockDim.x;
    const int lane = thread & 31;
    const int warp = thread >> 5;
    const int warps = threads >> 5;

    for (int i = thread; i < (1 << key_bits); i += threads) key_levels[i] = key_centroids[i];
    for (int i = thread; i < (1 << value_bits); i += threads)
        value_levels[i] = value_centroids[i];
    __syncthreads();

    const long long tokens = blocks * block;  // N, tokens per head
    const long long key_width = (dim * key_bits + 7) / 8;
    const long long value_width = (dim * value_bits + 7) / 8;
    const long long groups = (dim + 7) / 8;  // groups of 8 coordinates of a row
    // phase 3: groups handled per pass and token slices
    const int pass_groups = groups < threads ? (int)groups : threads;
    const int slices = pass_groups > 0 ? threads / pass_groups : 1;
    const int slice = pass_groups > 0 ? thread / pass_groups : 0;
    const int pass_group = pass_groups > 0 ? thread - slice * pass_groups : 0;
    const int pass_width = 8 * pass_groups;  // coordinates per pass

    const long long pairs = heads * blocks;
    for (long long pair = blockIdx.x; pair < pairs; pair += gridDim.x) {
        const long long head = pair / blocks;
        const long long block_index = pair - head * blocks;
        const long long first_token = head * tokens + block_index * block;  // row of (h, N)
        const float* pair_q =
            q_key + (head * query_blocks + (query_blocks > 1 ? block_index : 0)) * m * dim;
        const float* pair_offset =
            key_offset + (head * offset_blocks + (offset_blocks > 1 ? block_index : 0)) * m;
        const long long pair_out = pair * m;  // (h, b, 0) of maximum / total / acc rows

        for (long long tile_start = 0; tile_start < m; tile_start += QUERY_TILE) {
            const long long queries_left = m - tile_start;
            const int queries = queries_left < QUERY_TILE ? (int)queries_left : QUERY_TILE;
            __syncthreads();  // the previous tile's state has been read
            if (thread < QUERY_TILE) {
                tile_offset[thread] = thread < queries ? pair_offset[tile_start + thread] : 0.0f;
                running_max[thread] = negative_infinity;
                running_total[thread] = 0.0f;
            }
            // (the first __syncthreads of the chunk loop publishes them)

            for (long long chunk_start = 0; chunk_start < block; chunk_start += threads) {
                const long long chunk_left = block - chunk_start;
                const int chunk_tokens = chunk_left < threads ? (int)chunk_left : threads;
                const bool has_token = thread < chunk_tokens;
                const long long row = first_token + chunk_start + (has_token ? thread : 0);

                // ---- phase 1: the logits of token `thread` of the chunk
                float dot[QUERY_TILE];
#pragma unroll
                for (int t = 0; t < QUERY_TILE; ++t) dot[t] = 0.0f;
                const uint8* key_row = key_packed + row * key_width;
                const bool restage = chunk_start == 0 || dim > ATTENTION_DIM_CHUNK;
                for (long long dim_start = 0; dim_start < dim; dim_start += ATTENTION_DIM_CHUNK) {
                    const long long width_left = dim - dim_start;
                    const int width = width_left < ATTENTION_DIM_CHUNK ? (int)width_left
                                                                       : ATTENTION_DIM_CHUNK;
                    if (restage) {
                        __syncthreads();  // the staged coordinates are no longer read
                        // coordinates j < width of every row of the tile (0 past the queries)
                        for (int e = thread; e < QUERY_TILE * width; e += threads) {
                            const int t = e / width;  // consecutive threads: consecutive j
                            const int j = e - t * width;
                            query_tile[j * QUERY_TILE + t] =
                                t < queries ? pair_q[(tile_start + t) * dim + dim_start + j]
                                            : 0.0f;
                        }
                    }
                    __syncthreads();
                    if (has_token) {
                        for (int g = 0; g < width; g += 8) {
                            const int count = width - g < 8 ? width - g : 8;
                            const uint64 word = load_code_group<KEY_BITS>(
                                key_row + ((dim_start + g) >> 3) * key_bits,
                                (count * key_bits + 7) >> 3);
#pragma unroll
                            for (int k = 0; k < 8; ++k) {
                                if (k < count) {
                                    const float c =
                                        key_levels[(word >> (key_bits * k)) & key_mask];
                                    float q[QUERY_TILE];
                                    load_tile_row<QUERY_TILE>(
                                        query_tile + (g + k) * QUERY_TILE, q);
#pragma unroll
                                    for (int t = 0; t < QUERY_TILE; ++t)
                                        dot[t] = fmaf(q[t], c, dot[t]);
                                }
                            }
                        }
                    }
                }
                if (dim == 0) __syncthreads();  // (no staging loop ran) tile_offset is set
                if (has_token) {
                    const float factor = key_factor[row];
#pragma unroll
                    for (int t = 0; t < QUERY_TILE; ++t) {
                        // the reference's order: (dot * factor + offset) * scale, rounded
                        // at every step (no contraction to an fma)
                        weights[thread * QUERY_TILE + t] =
                            t < queries ? __fmul_rn(__fadd_rn(__fmul_rn(dot[t], factor),
                                                              tile_offset[t]),
                                                    scale)
                                        : 0.0f;
                    }
                    chunk_value_factor[thread] = value_factor[row];
                }
                __syncthreads();

                // ---- phase 2: max and sum of the chunk, per query, one warp per query
                for (int t = warp; t < queries; t += warps) {
                    float top = negative_infinity;
                    for (int n = lane; n < chunk_tokens; n += 32)
                        top = fmaxf(top, weights[n * QUERY_TILE + t]);
                    top = warp_max(top);
                    const float previous = running_max[t];
                    const float updated = fmaxf(previous, top);
                    float summed = 0.0f;
                    for (int n = lane; n < chunk_tokens; n += 32) {
                        const float w = expf(__fsub_rn(weights[n * QUERY_TILE + t], updated));
                        weights[n * QUERY_TILE + t] = w;
                        summed = __fadd_rn(summed, w);
                    }
                    summed = warp_sum(summed);
                    __syncwarp();  // every lane has read running_max[t] before it changes
                    if (lane == 0) {
                        // exp(-inf - updated) = 0 on the first chunk
                        const float factor = expf(__fsub_rn(previous, updated));
                        running_total[t] = __fadd_rn(__fmul_rn(running_total[t], factor), summed);
                        running_max[t] = updated;
                        rescale[t] = factor;
                    }
                }
                __syncthreads();

                // ---- phase 3: the weighted value sums, 8 coordinates x QUERY_TILE queries
                for (long long pass_start = 0; pass_start < groups; pass_start += pass_groups) {
                    const long long group = pass_start + pass_group;
                    const bool has_group = slice < slices && group < groups;
                    float sums[8][QUERY_TILE];
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
#pragma unroll
                        for (int t = 0; t < QUERY_TILE; ++t) sums[k][t] = 0.0f;
                    }
                    if (has_group) {
                        const long long remaining = dim - group * 8;
                        const int count = remaining < 8 ? (int)remaining : 8;
                        const int length = (count * value_bits + 7) >> 3;
                        const uint8* group_bytes = value_packed +
                                                   (first_token + chunk_start) * value_width +
                                                   group * value_bits;
                        for (int n = slice; n < chunk_tokens; n += slices) {
                            const uint64 word =
                                load_code_group<VALUE_BITS>(group_bytes + n * value_width, length);
                            const float factor = chunk_value_factor[n];
                            float w[QUERY_TILE];
                            load_tile_row<QUERY_TILE>(weights + n * QUERY_TILE, w);
#pragma unroll
                            for (int k = 0; k < 8; ++k) {
                                if (k < count) {
                                    const float v = __fmul_rn(
                                        value_levels[(word >> (value_bits * k)) & value_mask],
                                        factor);
#pragma unroll
                                    for (int t = 0; t < QUERY_TILE; ++t)
                                        sums[k][t] = fmaf(w[t], v, sums[k][t]);
                                }
                            }
                        }
                    }
#pragma unroll
                    for (int t = 0; t < QUERY_TILE; ++t) {
                        if (t < queries) {  // the same for every thread of the block
                            if (has_group) {
                                float* target = slice_sums + slice * pass_width + pass_group * 8;
#pragma unroll
                                for (int k = 0; k < 8; ++k) target[k] = sums[k][t];
                            }
                            __syncthreads();
                            for (int e = thread; e < pass_width; e += threads) {
                                const long long j = pass_start * 8 + e;
                                if (j < dim) {
                                    float s = slice_sums[e];
                                    for (int other = 1; other < slices; ++other)
                                        s = __fadd_rn(s, slice_sums[other * pass_width + e]);
                                    float* out = acc + (pair_out + tile_start + t) * dim + j;
                                    *out = chunk_start == 0
                                               ? s
                                               : __fadd_rn(__fmul_rn(*out, rescale[t]), s);
                                }
                            }
                            __syncthreads();  // slice_sums is free again
                        }
                    }
                }
                __syncthreads();  // the weights of the chunk are no longer read
            }
            if (thread < queries) {
                maximum[pair_out + tile_start + thread] = running_max[thread];
                total[pair_out + tile_start + thread] = running_total[thread];
            }
        }
    }
}

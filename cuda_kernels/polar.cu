// PolarQuant's encode and decode kernels: the recursive polar transform of blocks of
// 2**LEVELS coordinates, per-level angle codebooks, packed per-level codes. LEVELS = 1..8.
//
// The NumPy references latkv.polar.polar_quantize_reference and
// latkv.polar.polar_dequantize_reference are the specification; the packed layout of each
// level is that of latkv/packing.py (code j of a row occupies bits j*b .. j*b + b - 1 of the
// row, LSB first; a row of m codes takes ceil(m * b / 8) bytes; unused high bits of the last
// byte are 0 when written and ignored when read).
//
// Per-level parameters. level_bits packs the code width b_l (1..8) of level l = 1..LEVELS
// into bits 4(l-1) .. 4(l-1)+3. All levels' tables are concatenated into one float64 array
// (level 1 first) and all levels' packed rows into one uint8 buffer, row-major, each row the
// concatenation of the rows of levels 1..LEVELS:
//     table offset of level l   = sum_{k<l} (2**b_k - 1)  (boundaries)  or  sum_{k<l} 2**b_k
//                                                                          (centroids)
//     byte offset of level l    = sum_{k<l} ceil((dim >> k) * b_k / 8)
//     row_bytes                 = sum_{k<=LEVELS} ceil((dim >> k) * b_k / 8)
// (the Python side slices the buffer into the per-level arrays, or concatenates them into it).
// Level l holds dim >> l codes per row, ordered by block, then by position in the block.
//
//   template <int LEVELS>
//   __global__ void polar_quantize(const float* rotated, const double* boundaries,
//                                  uint8* packed, double* radius, long long rows,
//                                  long long dim, unsigned int level_bits)
//     rotated (rows, dim) float32, dim a multiple of B = 2**LEVELS; boundaries the
//     concatenated increasing boundaries (2**b_l - 1 per level) float64; packed
//     (rows, row_bytes) uint8, written in full; radius (rows, dim >> LEVELS) float64.
//     Per block, in float64: level 1 pairs (a, b) = (y[2i], y[2i+1]): theta = atan2(b, a),
//     plus 2 pi if negative, squared radius a*a + b*b (__dmul_rn / __dadd_rn: no contraction;
//     a float32 value squared is exact in float64 anyway); level l >= 2 pairs consecutive
//     squared radii (s1, s2): psi = atan2(sqrt(s2), sqrt(s1)), squared radius s1 + s2; the
//     block radius is the square root of the last one. A code is #{boundaries < angle} (NaN
//     sorts last, as in numpy.searchsorted: code 2**b - 1). sqrt, + and * are IEEE
//     (correctly rounded), so the squared radii and radii equal the reference's bit for bit;
//     CUDA's double atan2 (<= 2 ulp) may differ from the host libm's by an ulp, so a code can
//     differ only for an angle within about 1e-16 of a boundary.
//     Work split: one thread per (row, group of G consecutive blocks), grid-stride; G is the
//     smallest power of two (<= 8) for which every level's codes of G blocks fill whole bytes,
//     so no two threads write the same byte. The thread computes its blocks one after the
//     other (squared radii in a local array of B / 2 doubles) and streams each level's codes
//     through a small bit accumulator into its bytes of that level; the tail group of a row
//     writes the row's last partial byte, padding bits 0. Boundaries sit in shared memory.
//
//   template <int LEVELS>
//   __global__ void polar_dequantize(const uint8* packed, const double* radius,
//                                    const double* centroids, float* out, long long rows,
//                                    long long dim, unsigned int level_bits)
//     packed (rows, row_bytes) uint8, radius (rows, dim >> LEVELS) float64, centroids the
//     concatenated angle centroids (2**b_l per level) float64, out (rows, dim) float32.
//     From the block radius down, in float64: at level l = LEVELS .. 2 each radius r becomes
//     (r cos psi, r sin psi), psi the centroid of its code, interleaved in order; at level 1
//     each r becomes (r cos theta, r sin theta), rounded to float32. Equal to the reference up
//     to the ulps of CUDA's sin / cos. One thread per (row, block), grid-stride; the radii in a
//     local array of B / 2 doubles, the centroids in shared memory.
//
// Rows and offsets are 64-bit. C-contiguous arrays only. Compile without fast math
// (COMPILE_OPTIONS in latkv/_gpu/cuda_sources.py). Instantiated by NVRTC name expressions
// "polar_quantize<LEVELS>", "polar_dequantize<LEVELS>".

typedef unsigned char uint8;

constexpr int POLAR_MAX_LEVELS = 8;
// 2 * numpy.pi: 2 * fl(pi) is exact, so this is the reference's TWO_PI.
constexpr double POLAR_TWO_PI = 2.0 * 3.141592653589793238462643383279502884;

// The code width of level `level` (0-based) from the packed level_bits.
__device__ __forceinline__ int polar_level_bits(unsigned int level_bits, int level) {
    return (int)((level_bits >> (4 * level)) & 15u);
}

// #{edges[i] < angle} over the 2**bits - 1 increasing edges: a branchless binary search, bits
// steps. NaN goes to the last cell, where numpy.searchsorted puts it.
__device__ __forceinline__ unsigned int polar_cell(double angle, const double* edges, int bits) {
    if (isnan(angle)) return (1u << bits) - 1u;
    unsigned int code = 0;
    for (unsigned int step = 1u << (bits - 1); step > 0; step >>= 1) {
        // code + step - 1 <= 2**bits - 2: always an edge
        if (edges[code + step - 1] < angle) code += step;
    }
    return code;
}

// Code j of a packed row of bits-bit codes: bits j*bits .. j*bits + bits - 1, LSB first.
__device__ __forceinline__ unsigned int polar_code(const uint8* row, long long j, int bits) {
    const long long bit = j * bits;
    const long long byte = bit >> 3;
    const int shift = (int)(bit & 7);
    unsigned int value = (unsigned int)row[byte] >> shift;
    if (shift + bits > 8) value |= (unsigned int)row[byte + 1] << (8 - shift);
    return value & ((1u << bits) - 1u);
}

// Appends codes LSB-first to a run of bytes that starts on a byte boundary; a byte is stored
// once it is full, the last partial one by flush() (its unused high bits 0).
struct PolarBitWriter {
    uint8* target;
    unsigned int word;  // fewer than 16 pending bits
    int fill;

    __device__ __forceinline__ void put(unsigned int code, int bits) {
        word |= code << fill;
        fill += bits;
        while (fill >= 8) {
            *target++ = (uint8)(word & 0xFFu);
            word >>= 8;
            fill -= 8;
        }
    }

    __device__ __forceinline__ void flush() {
        if (fill > 0) *target = (uint8)(word & 0xFFu);
    }
};

template <int LEVELS>
__global__ void polar_quantize(const float* __restrict__ rotated,
                               const double* __restrict__ boundaries,
                               uint8* __restrict__ packed, double* __restrict__ radius,
                               long long rows, long long dim, unsigned int level_bits) {
    static_assert(LEVELS >= 1 && LEVELS <= POLAR_MAX_LEVELS, "LEVELS must be 1..8");
    constexpr int BLOCK = 1 << LEVELS;
    constexpr int HALF = BLOCK / 2;
    __shared__ double edges[LEVELS * 255];

    int bits[LEVELS];
    int table[LEVELS];
    long long offset[LEVELS];
    int table_size = 0;
    long long row_bytes = 0;
    int group = 1;  // blocks per thread: every level's codes of `group` blocks fill whole bytes
#pragma unroll
    for (int l = 0; l < LEVELS; ++l) {
        bits[l] = polar_level_bits(level_bits, l);
        table[l] = table_size;
        table_size += (1 << bits[l]) - 1;
        offset[l] = row_bytes;
        row_bytes += ((dim >> (l + 1)) * bits[l] + 7) / 8;
        const int block_bits = (HALF >> l) * bits[l];
        const int low = block_bits & -block_bits;  // largest power of two dividing it
        const int needed = low >= 8 ? 1 : 8 / low;
        if (needed > group) group = needed;
    }
    for (int i = threadIdx.x; i < table_size; i += blockDim.x) edges[i] = boundaries[i];
    __syncthreads();

    const long long blocks_per_row = dim >> LEVELS;
    const long long groups_per_row = (blocks_per_row + group - 1) / group;
    const long long total = rows * groups_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / groups_per_row;
        const long long first = (index - row * groups_per_row) * group;
        const long long remaining = blocks_per_row - first;
        const int count = remaining < group ? (int)remaining : group;

        PolarBitWriter writers[LEVELS];
#pragma unroll
        for (int l = 0; l < LEVELS; ++l) {
            // first is a multiple of group: the level's bits before it fill whole bytes
            writers[l].target =
                packed + row * row_bytes + offset[l] + first * (HALF >> l) * bits[l] / 8;
            writers[l].word = 0;
            writers[l].fill = 0;
        }

        double squared[HALF];
        for (int k = 0; k < count; ++k) {
            const float* y = rotated + row * dim + (first + k) * BLOCK;
            for (int i = 0; i < HALF; ++i) {  // level 1: pairs of coordinates
                const double a = (double)y[2 * i];
                const double b = (double)y[2 * i + 1];
                double theta = atan2(b, a);
                if (theta < 0.0) theta = __dadd_rn(theta, POLAR_TWO_PI);
                writers[0].put(polar_cell(theta, edges + table[0], bits[0]), bits[0]);
                squared[i] = __dadd_rn(__dmul_rn(a, a), __dmul_rn(b, b));
            }
#pragma unroll
            for (int l = 1; l < LEVELS; ++l) {  // levels >= 2: pairs of radii
                const int angles = HALF >> l;
                for (int i = 0; i < angles; ++i) {
                    const double s1 = squared[2 * i];
                    const double s2 = squared[2 * i + 1];
                    const double psi = atan2(__dsqrt_rn(s2), __dsqrt_rn(s1));
                    writers[l].put(polar_cell(psi, edges + table[l], bits[l]), bits[l]);
                    squared[i] = __dadd_rn(s1, s2);  // i < 2i: already read
                }
            }
            radius[row * blocks_per_row + first + k] = __dsqrt_rn(squared[0]);
        }
#pragma unroll
        for (int l = 0; l < LEVELS; ++l) writers[l].flush();  // only the tail group of a row
    }
}

template <int LEVELS>
__global__ void polar_dequantize(const uint8* __restrict__ packed,
                                 const double* __restrict__ radius,
                                 const double* __restrict__ centroids, float* __restrict__ out,
                                 long long rows, long long dim, unsigned int level_bits) {
    static_assert(LEVELS >= 1 && LEVELS <= POLAR_MAX_LEVELS, "LEVELS must be 1..8");
    constexpr int BLOCK = 1 << LEVELS;
    constexpr int HALF = BLOCK / 2;
    __shared__ double points[LEVELS * 256];

    int bits[LEVELS];
    int table[LEVELS];
    long long offset[LEVELS];
    int table_size = 0;
    long long row_bytes = 0;
#pragma unroll
    for (int l = 0; l < LEVELS; ++l) {
        bits[l] = polar_level_bits(level_bits, l);
        table[l] = table_size;
        table_size += 1 << bits[l];
        offset[l] = row_bytes;
        row_bytes += ((dim >> (l + 1)) * bits[l] + 7) / 8;
    }
    for (int i = threadIdx.x; i < table_size; i += blockDim.x) points[i] = centroids[i];
    __syncthreads();

    const long long blocks_per_row = dim >> LEVELS;
    const long long total = rows * blocks_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / blocks_per_row;
        const long long block = index - row * blocks_per_row;
        const uint8* row_codes = packed + row * row_bytes;

        double r[HALF];
        r[0] = radius[index];
#pragma unroll
        for (int l = LEVELS - 1; l >= 1; --l) {  // levels L .. 2: each radius splits in two
            const int angles = HALF >> l;
            const uint8* level_codes = row_codes + offset[l];
            for (int i = angles - 1; i >= 0; --i) {  // backwards: 2i, 2i + 1 >= i
                const double psi =
                    points[table[l] + polar_code(level_codes, block * angles + i, bits[l])];
                double s, c;
                sincos(psi, &s, &c);
                const double ri = r[i];
                r[2 * i] = __dmul_rn(ri, c);
                r[2 * i + 1] = __dmul_rn(ri, s);
            }
        }
        const uint8* level_codes = row_codes + offset[0];
        float* target = out + row * dim + block * BLOCK;
        for (int i = 0; i < HALF; ++i) {  // level 1: each radius gives a pair of coordinates
            const double theta =
                points[table[0] + polar_code(level_codes, block * HALF + i, bits[0])];
            double s, c;
            sincos(theta, &s, &c);
            target[2 * i] = __double2float_rn(__dmul_rn(r[i], c));
            target[2 * i + 1] = __double2float_rn(__dmul_rn(r[i], s));
        }
    }
}

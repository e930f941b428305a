// The fixed-rate E8 Voronoi code (latkv/e8.py: voronoi_encode_reference,
// voronoi_decode_reference), BITS = 1..8, bit-exact with the NumPy references: the same scales
// (float16 values held as float32), labels and points.
//
//   template <int BITS>
//   __global__ void voronoi_encode(const float* x, const double* multipliers, float* scale,
//                                  uint8* labels, long long rows, long long dim,
//                                  long long rungs)
//     x (rows, dim) float32, dim a multiple of 8; multipliers (rungs,) float64, the ladder of
//     latkv.e8.scale_ladder(BITS); scale (rows,) float32 and labels (rows, dim) uint8, written
//     in full. One thread per row, grid-stride.
//
//   template <int BITS>
//   __global__ void voronoi_decode(const uint8* labels, const float* scale, float* out,
//                                  long long rows, long long dim)
//     labels (rows, dim) uint8 (values below 2^BITS), scale (rows,) float32, out (rows, dim)
//     float32, written in full. One thread per (row, group of 8), grid-stride.
//
// The operations of the references, each an explicit round-to-nearest intrinsic where float
// arithmetic could otherwise be contracted or approximated:
//   * base = double(max_i |x_i|) / 2^BITS; the candidate of rung i is p = base * m_i (__dmul_rn)
//     rounded ONCE to float16, halves to even (NumPy's float64 -> float16 cast): with
//     2^e <= p < 2^(e + 1) the float16 quantum is 2^(e - 10), 2^-24 below 2^-14 (the
//     subnormals), and ldexp(rint(ldexp(p, -k)), k) with k = max(e - 10, -24) is exact in
//     double; then fmaxf(s, 2^-24). The caller keeps p below 65504 (latkv.e8.E8Stage checks
//     the top rung), so the float16 overflow to infinity never happens here;
//   * the search: coarse rungs 0, 8, ... below rungs - 1 (else rungs - 1, never tried), then
//     the 7 rungs below the coarse one, lowest first, >= 0 only (else the coarse one). A rung
//     fits when every group's lambda = nearest_e8(__fdiv_rn(x_g, s)) has
//     nearest_e8(__fdiv_rn(__fsub_rn(lambda, a), q)) = 0 (-0.0 counts as 0), a = TIE_OFFSET;
//     groups are tried from the one that failed the previous rung on (any order gives the same
//     answer), and most are decided with a margin by root_max (the largest <v, r> over E8's
//     roots, of v estimated as root_max(x_g) / s, then of w) without their lambda or without
//     the second search (latkv/_cpu/voronoi.py, _cell_bounds and _SLACK, gives the argument);
//     the rest run the exact search;
//   * the nearest points are those of lattice.cu (included below: nearest_d8_point,
//     squared_distance, the E8 step of its nearest_e8 kernel), with its tie rules;
//   * labels k = rint(lambda G^-1) mod 2^BITS in integers: with d = 2 lambda, k_7 = d_7,
//     k_j = (sum_{i=j..6} (d_i - d_7)) / 2 for j = 1..6, k_0 = (sum_{i=0..6} (d_i - d_7)) / 4
//     (exact divisions), masked to BITS bits;
//   * decode: y = k G in halves (2 y_7 = k_7, 2 y_6 = 2 k_6 + k_7, 2 y_j = 2 (k_j - k_{j+1}) +
//     k_7 for j = 1..5, 2 y_0 = 4 k_0 - 2 k_1 + k_7; exact in float32), then
//     (y - q * nearest_e8((y - a) / q)) * s, each step __f*_rn.
//
// Work split: a row's groups are loaded as two float4 when the pointers are 16-byte aligned
// (rows are multiples of 32 bytes), else as 8 floats; labels are stored / loaded as one 64-bit
// word per group when 8-byte aligned, else byte by byte. An encoding thread reloads its row's
// groups for every rung it tries (from L1 / L2). Rows and offsets are 64-bit. C-contiguous
// arrays only. Compile without fast math (COMPILE_OPTIONS in latkv/_gpu/cuda_sources.py).
// Instantiated by the NVRTC name expressions "voronoi_encode<BITS>", "voronoi_decode<BITS>".
//
// The line below is not left to the preprocessor: latkv._gpu.cuda_sources.source() replaces it
// with the text of lattice.cu (one copy of the nearest-point code for every kernel file).
#include "lattice.cu"

typedef unsigned char uint8;
typedef unsigned long long uint64;

// 2^-24: the smallest float16, the floor of every scale
constexpr float SMALLEST_SCALE = 5.9604644775390625e-08f;
// max <w, r> over the roots below which nearest_e8(w) = 0, above which it is not
constexpr double INSIDE = 1.0 - 1.0 / 1024.0;
constexpr double OUTSIDE = 1.0 + 1.0 / 1024.0;
// root_max(x_g) / s against the root bound of float32(x_g / s): a relative 2^-21 at most
constexpr double SLACK = 1.0 / 1048576.0;

// a_i = 2^(i - 12), latkv.e8.TIE_OFFSET (float32 exponent field 127 + i - 12)
__device__ __forceinline__ float tie_offset(int i) { return __int_as_float((115 + i) << 23); }

// max(float32(fp16(base * multiplier)), 2^-24): one rounding from double, halves to even.
__device__ __forceinline__ float scale_candidate(double base, double multiplier) {
    const double p = __dmul_rn(base, multiplier);
    int exponent;
    frexp(p, &exponent);                        // p = f 2^exponent, f in [0.5, 1)
    const int step = max(exponent - 11, -24);   // the float16 quantum 2^step of p's binade
    const double rounded = ldexp(rint(ldexp(p, -step)), step);
    return fmaxf(__double2float_rn(rounded), SMALLEST_SCALE);
}

// Whether nearest_e8(w) is the zero vector (-0.0 included). A nonzero D8 candidate decides
// it: the coset candidate is never zero either.
__device__ __forceinline__ bool nearest_is_zero(const float (&w)[8]) {
    float integer[8];
    nearest_d8_point(w, integer);
    bool zero = true;
#pragma unroll
    for (int i = 0; i < 8; ++i) zero = zero && integer[i] == 0.0f;
    if (!zero) return false;
    float shifted[8], coset[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) shifted[i] = __fsub_rn(w[i], 0.5f);
    nearest_d8_point(shifted, coset);
#pragma unroll
    for (int i = 0; i < 8; ++i) coset[i] = __fadd_rn(coset[i], 0.5f);
    return squared_distance(w, integer) <= squared_distance(w, coset);
}

// max <v, r> over E8's 240 roots: the larger of the two largest |v_i| summed (the roots
// +-e_i +- e_j) and sum |v_i| / 2 less the smallest |v_i| when an odd number of v_i are
// negative (the roots (+-1/2)^8 with an even number of minus signs). Only compared with
// margins, so its own roundings do not matter.
__device__ __forceinline__ double root_max(const float (&v)[8]) {
    double first = 0.0, second = 0.0, total = 0.0, smallest = 1.0e300;
    int negatives = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const double a = fabs((double)v[i]);
        total += a;
        second = fmax(second, fmin(first, a));
        first = fmax(first, a);
        smallest = fmin(smallest, a);
        negatives += v[i] < 0.0f;
    }
    if (negatives & 1) total -= 2.0 * smallest;
    return fmax(first + second, 0.5 * total);
}

// -1 when every group of the row fits at scale s, else a group that does not; groups are
// tried from `hot` on, wrapping. root_max(x_g) / s is within a factor 1 +- SLACK of the root
// bound of v = x_g / s (latkv/_cpu/voronoi.py, _SLACK), so most groups are decided without
// a division or a nearest-point search.
template <int BITS>
__device__ long long fits(const float* __restrict__ row, long long groups, bool vector, float s,
                          long long hot) {
    constexpr float Q = (float)(1 << BITS);
    constexpr double INNER = (double)(1 << BITS) * INSIDE - 1.5;
    constexpr double OUTER = (double)(1 << BITS) * OUTSIDE + 1.5;
    const double inverse = __ddiv_rn(1.0, (double)s);
    for (long long t = 0; t < groups; ++t) {
        long long g = hot + t;
        if (g >= groups) g -= groups;
        float v[8], lambda[8], w[8];
        load_row(row + g * 8, vector, v);
        const double estimate = root_max(v) * inverse;
        if (estimate * (1.0 + SLACK) <= INNER) continue;  // lambda is in the code, whichever
        if (estimate * (1.0 - SLACK) >= OUTER) return g;  // it is not
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fdiv_rn(v[i], s);
        nearest_e8_point(v, lambda);
#pragma unroll
        for (int i = 0; i < 8; ++i) w[i] = __fdiv_rn(__fsub_rn(lambda[i], tie_offset(i)), Q);
        const double bound = root_max(w);
        if (bound <= INSIDE) continue;          // nearest_e8(w) = 0
        if (bound >= OUTSIDE || !nearest_is_zero(w)) return g;
    }
    return -1;
}

// The 8 labels of an E8 point, one per byte of the word (byte i: label i).
template <int BITS>
__device__ __forceinline__ uint64 point_labels(const float (&lambda)[8]) {
    constexpr long long MASK = (1ll << BITS) - 1;
    long long doubled[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) doubled[i] = (long long)__fmul_rn(lambda[i], 2.0f);  // exact
    uint64 word = (uint64)(doubled[7] & MASK) << 56;
    long long total = 0;
#pragma unroll
    for (int i = 6; i >= 1; --i) {
        total += doubled[i] - doubled[7];
        word |= (uint64)((total / 2) & MASK) << (8 * i);  // an exact division
    }
    total += doubled[0] - doubled[7];
    return word | (uint64)((total / 4) & MASK);
}

template <int BITS>
__global__ void voronoi_encode(const float* __restrict__ x,
                               const double* __restrict__ multipliers,
                               float* __restrict__ scale, uint8* __restrict__ labels,
                               long long rows, long long dim, long long rungs) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    const bool vector = aligned_16(x, x);
    const bool wide = (((unsigned long long)labels) & 7ull) == 0ull;
    const long long groups = dim / 8;
    const long long last = rungs - 1;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += stride) {
        const float* row = x + r * dim;
        float largest = 0.0f;
        for (long long g = 0; g < groups; ++g) {
            float v[8];
            load_row(row + g * 8, vector, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) largest = fmaxf(largest, fabsf(v[i]));
        }
        const double base = __ddiv_rn((double)largest, (double)(1 << BITS));  // exact
        long long hot = 0;
        long long coarse = last;
        for (long long rung = 0; rung < last; rung += 8) {
            const long long failed =
                fits<BITS>(row, groups, vector, scale_candidate(base, multipliers[rung]), hot);
            if (failed < 0) {
                coarse = rung;
                break;
            }
            hot = failed;
        }
        long long chosen = coarse;
        for (long long step = 7; step >= 1; --step) {  // coarse - 7 .. coarse - 1, lowest first
            const long long rung = coarse - step;
            if (rung < 0) continue;
            const long long failed =
                fits<BITS>(row, groups, vector, scale_candidate(base, multipliers[rung]), hot);
            if (failed < 0) {
                chosen = rung;
                break;
            }
            hot = failed;
        }
        const float s = scale_candidate(base, multipliers[chosen]);
        scale[r] = s;
        uint8* target = labels + r * dim;
        for (long long g = 0; g < groups; ++g) {
            float v[8], lambda[8];
            load_row(row + g * 8, vector, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = __fdiv_rn(v[i], s);
            nearest_e8_point(v, lambda);
            const uint64 word = point_labels<BITS>(lambda);
            if (wide) {
                reinterpret_cast<uint64*>(target)[g] = word;
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) target[g * 8 + i] = (uint8)(word >> (8 * i));
            }
        }
    }
}

template <int BITS>
__global__ void voronoi_decode(const uint8* __restrict__ labels, const float* __restrict__ scale,
                               float* __restrict__ out, long long rows, long long dim) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    constexpr float Q = (float)(1 << BITS);
    const bool vector = aligned_16(out, out);
    const bool wide = (((unsigned long long)labels) & 7ull) == 0ull;
    const long long groups = dim / 8;
    const long long total = rows * groups;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long r = index / groups;
        const uint8* source = labels + index * 8;  // row r, group index - r * groups
        int k[8];
        if (wide) {
            const uint64 word = reinterpret_cast<const uint64*>(labels)[index];
#pragma unroll
            for (int i = 0; i < 8; ++i) k[i] = (int)((word >> (8 * i)) & 0xFFull);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) k[i] = source[i];
        }
        float y[8], w[8], shift[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int following = i == 0 ? 2 * k[1] : (i < 6 ? k[i + 1] : 0);
            const int doubled = i == 7 ? k[7]
                                       : (i == 0 ? 4 * k[0] - following + k[7]
                                                 : 2 * (k[i] - following) + k[7]);
            y[i] = __fmul_rn((float)doubled, 0.5f);  // exact
            w[i] = __fdiv_rn(__fsub_rn(y[i], tie_offset(i)), Q);
        }
        nearest_e8_point(w, shift);
        const float s = scale[r];
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = __fmul_rn(__fsub_rn(y[i], __fmul_rn(Q, shift[i])), s);
        store_row(out + index * 8, vector, y);
    }
}

// Nearest points of the D8 and E8 lattices (latkv/lattice.py: nearest_d8_reference,
// nearest_e8_reference), bit-exact with the NumPy references, signed zeros included.
//
//   __global__ void nearest_d8(const float* x, float* out, long long rows)
//   __global__ void nearest_e8(const float* x, float* out, long long rows)
//     x (rows, 8) float32, out (rows, 8) float32 lattice points, written in full.
//
// The tie rules of latkv/lattice.py, operation by operation:
//   * r = rintf(x) (round half to even, as numpy.rint), e = x - r in float32 (exact);
//   * the parity of r is that of the sum of (int)r (exact for |x| < 2^21, as the reference's
//     float64 sum); when odd, the first coordinate of largest |e| (a strict > scan from index
//     0) moves by +1 if its e >= 0 (-0.0 included), else -1, in float32;
//   * E8: the coset candidate is the D8 point of (x - 0.5f) plus 0.5f, both in float32; each
//     distance is sum_i double(x_i - y_i)^2 with x_i - y_i a float32 difference, accumulated
//     in coordinate order 0..7 with __dmul_rn / __dadd_rn (never contracted into an FMA;
//     a square of a float32 is exact in double anyway); the D8 candidate wins a tie (<=).
// Every float32 operation is an explicit round-to-nearest intrinsic too (__fsub_rn,
// __fadd_rn), so no compiler flag can change a result.
//
// Work split: one thread per row of 8 coordinates, grid-stride over the rows; a row is loaded
// and stored as two float4 when both pointers are 16-byte aligned (rows are 32 bytes), else
// as 8 floats. The 8 coordinates live in registers (every loop over them is unrolled, the
// coordinate to fix is selected by comparison, never indexed). Rows and offsets are 64-bit.
// C-contiguous arrays only. Compile without fast math (COMPILE_OPTIONS in
// latkv/_gpu/cuda_sources.py). Instantiated by the NVRTC name expressions "nearest_d8" and
// "nearest_e8".

// y = the nearest D8 point of v (module tie rules).
__device__ __forceinline__ void nearest_d8_point(const float (&v)[8], float (&y)[8]) {
    int parity = 0;
    float best = -1.0f;
    int worst = 0;
    float worst_error = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float r = rintf(v[i]);
        const float e = __fsub_rn(v[i], r);  // exact
        const float a = fabsf(e);
        if (a > best) {  // strict: the first index among equals
            best = a;
            worst = i;
            worst_error = e;
        }
        parity ^= (int)r & 1;  // two's complement: the low bit is the parity of negatives too
        y[i] = r;
    }
    const float step = worst_error >= 0.0f ? 1.0f : -1.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (parity && i == worst) y[i] = __fadd_rn(y[i], step);
    }
}

// sum_i double(x_i - y_i)^2, accumulated in order 0..7 without contraction.
__device__ __forceinline__ double squared_distance(const float (&x)[8], const float (&y)[8]) {
    double total = 0.0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const double d = (double)__fsub_rn(x[i], y[i]);
        total = __dadd_rn(total, __dmul_rn(d, d));
    }
    return total;
}

__device__ __forceinline__ bool aligned_16(const void* a, const void* b) {
    return (((unsigned long long)a | (unsigned long long)b) & 15ull) == 0ull;
}

__device__ __forceinline__ void load_row(const float* __restrict__ source, bool vector,
                                         float (&v)[8]) {
    if (vector) {
        const float4 low = reinterpret_cast<const float4*>(source)[0];
        const float4 high = reinterpret_cast<const float4*>(source)[1];
        v[0] = low.x; v[1] = low.y; v[2] = low.z; v[3] = low.w;
        v[4] = high.x; v[5] = high.y; v[6] = high.z; v[7] = high.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = source[i];
    }
}

__device__ __forceinline__ void store_row(float* __restrict__ target, bool vector,
                                          const float (&y)[8]) {
    if (vector) {
        reinterpret_cast<float4*>(target)[0] = make_float4(y[0], y[1], y[2], y[3]);
        reinterpret_cast<float4*>(target)[1] = make_float4(y[4], y[5], y[6], y[7]);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) target[i] = y[i];
    }
}

__global__ void nearest_d8(const float* __restrict__ x, float* __restrict__ out,
                           long long rows) {
    const bool vector = aligned_16(x, out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < rows;
         row += stride) {
        float v[8], y[8];
        load_row(x + row * 8, vector, v);
        nearest_d8_point(v, y);
        store_row(out + row * 8, vector, y);
    }
}

// lambda = the nearest E8 point of v: the nearer of the D8 point of v and the D8 point of
// v - 1/2 plus 1/2 (a tie goes to D8). voronoi.cu includes this file and uses it too.
__device__ __forceinline__ void nearest_e8_point(const float (&v)[8], float (&lambda)[8]) {
    float shifted[8], coset[8];
    nearest_d8_point(v, lambda);
#pragma unroll
    for (int i = 0; i < 8; ++i) shifted[i] = __fsub_rn(v[i], 0.5f);
    nearest_d8_point(shifted, coset);
#pragma unroll
    for (int i = 0; i < 8; ++i) coset[i] = __fadd_rn(coset[i], 0.5f);
    const bool keep = squared_distance(v, lambda) <= squared_distance(v, coset);  // tie: D8
#pragma unroll
    for (int i = 0; i < 8; ++i) lambda[i] = keep ? lambda[i] : coset[i];
}

__global__ void nearest_e8(const float* __restrict__ x, float* __restrict__ out,
                           long long rows) {
    const bool vector = aligned_16(x, out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < rows;
         row += stride) {
        float v[8], lambda[8];
        load_row(x + row * 8, vector, v);
        nearest_e8_point(v, lambda);
        store_row(out + row * 8, vector, lambda);
    }
}

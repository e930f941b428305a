// Walsh-Hadamard stage on a segment of each row (the "cupy" backend of "hadamard_segment").
//
//   template <int LOG_SIZE>
//   __global__ void hadamard_segment(const float* x, float* y, const float* signs,
//                                    long long rows, int dim, int start, int inverse)
//
//   x      : (rows, dim) float32, C-contiguous, read only
//   y      : (rows, dim) float32, C-contiguous, written in full (must not alias x)
//   signs  : (SIZE,) float32 of +-1, SIZE = 1 << LOG_SIZE, start + SIZE <= dim
//   inverse: 0 -> y[r, start:start+SIZE] = H (signs * x[r, start:start+SIZE]) / sqrt(SIZE)
//            1 -> y[r, start:start+SIZE] = signs * H x[r, start:start+SIZE] / sqrt(SIZE)
//   Every other coordinate of y is copied from x. H is the Sylvester-order Hadamard matrix;
//   the result equals latkv.rotations.hadamard_segment_reference to the last bit (same
//   butterflies, same order, float32 throughout).
//
// Launch: block = (HADAMARD_THREADS,) = 256 threads, no dynamic shared memory, any grid
// size (grid-stride loop over rows); ceil(rows / rows_per_block(LOG_SIZE)) blocks cover
// every row once, where rows_per_block = (HADAMARD_THREADS / 32) * (32 / GROUP) and
// GROUP = min(SIZE, 32).
//
// Work split: a row is handled by a GROUP of lanes of one warp (32 lanes for SIZE >= 32, so
// a warp handles 32 / GROUP rows for smaller SIZE). Lane l of the group holds, in registers,
// the ELEMS = SIZE / GROUP segment coordinates e * GROUP + l (e = 0 .. ELEMS-1): loads and
// stores are coalesced. Butterflies of stride h < GROUP pair lanes l and l ^ h (warp
// shuffle); strides h >= GROUP pair registers e and e ^ (h / GROUP) of the same lane. Rows
// are indexed with 64-bit integers. No shared memory, no __syncthreads: warps are
// independent, and every lane of a warp reaches every shuffle (rows past the end are
// computed on zeros and not stored).

#define HADAMARD_THREADS 256

template <int LOG_SIZE>
__global__ void __launch_bounds__(HADAMARD_THREADS) hadamard_segment(
    const float* __restrict__ x, float* __restrict__ y, const float* __restrict__ signs,
    long long rows, int dim, int start, int inverse)
{
    constexpr int SIZE = 1 << LOG_SIZE;
    constexpr int GROUP = SIZE < 32 ? SIZE : 32;        // lanes per row
    constexpr int ELEMS = SIZE / GROUP;                 // registers per lane
    constexpr int ROWS_PER_WARP = 32 / GROUP;
    constexpr int WARPS_PER_BLOCK = HADAMARD_THREADS / 32;
    // float32(1 / sqrt(SIZE)), rounded as the reference rounds it: sqrt(1/2) rounded to
    // float, times an exact power of two.
    constexpr float SCALE =
        (LOG_SIZE % 2 ? 0.70710678118654752440f : 1.0f) / float(1 << (LOG_SIZE / 2));

    const int lane = threadIdx.x & 31;
    const int lane_in_group = lane % GROUP;
    const int group_in_warp = lane / GROUP;
    const long long warp_global =
        (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const long long warps_total = (long long)gridDim.x * WARPS_PER_BLOCK;
    const int untouched = dim - SIZE;

    float sign[ELEMS];
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) sign[e] = signs[e * GROUP + lane_in_group];

    // The loop bound depends on the warp only, so whole warps iterate together.
    for (long long first_row = warp_global * ROWS_PER_WARP; first_row < rows;
         first_row += warps_total * ROWS_PER_WARP) {
        const long long row = first_row + group_in_warp;
        const bool valid = row < rows;
        const long long row_offset = row * (long long)dim;
        const float* x_row = x + row_offset;
        float* y_row = y + row_offset;

        float v[ELEMS];
#pragma unroll
        for (int e = 0; e < ELEMS; ++e) {
            const float value = valid ? x_row[start + e * GROUP + lane_in_group] : 0.0f;
            v[e] = inverse ? value : value * sign[e];
        }

        // strides 1 .. GROUP/2: across lanes
#pragma unroll
        for (int h = 1; h < GROUP; h <<= 1) {
            const bool upper = (lane_in_group & h) != 0;
#pragma unroll
            for (int e = 0; e < ELEMS; ++e) {
                const float other = __shfl_xor_sync(0xffffffffu, v[e], h);
                // lower lane holds a, upper lane holds b: (a, b) -> (a + b, a - b)
                v[e] = upper ? other - v[e] : v[e] + other;
            }
        }
        // strides GROUP .. SIZE/2: across registers of one lane
#pragma unroll
        for (int k = 1; k < ELEMS; k <<= 1) {
#pragma unroll
            for (int e = 0; e < ELEMS; ++e) {
                if ((e & k) == 0) {
                    const float a = v[e];
                    const float b = v[e | k];
                    v[e] = a + b;
                    v[e | k] = a - b;
                }
            }
        }

        if (valid) {
#pragma unroll
            for (int e = 0; e < ELEMS; ++e) {
                const float scaled = v[e] * SCALE;
                y_row[start + e * GROUP + lane_in_group] = inverse ? scaled * sign[e] : scaled;
            }
            for (int j = lane_in_group; j < untouched; j += GROUP) {
                const int column = j < start ? j : j + SIZE;
                y_row[column] = x_row[column];
            }
        }
    }
}

// Bit packing of BITS-bit codes (BITS = 1..8) along the last axis, LSB-first.
//
// Layout (latkv/packing.py is the specification): code i of a row occupies bits
// i*BITS .. i*BITS + BITS - 1 of the row, bit j of the row being bit j % 8 of byte j / 8.
// A row of n codes takes ceil(n * BITS / 8) bytes; unused high bits of the last byte are 0.
//
// Eight codes fill exactly BITS bytes, so each thread handles one (row, group of 8 codes):
// it reads the 8 code bytes as one 64-bit word (a single load when the address is 8-byte
// aligned, as it is whenever n % 8 == 0 and the array starts aligned), squeezes them together
// in three shift-and-mask steps (bytes -> 16-bit lanes of 2*BITS bits -> 32-bit lanes of
// 4*BITS bits -> 8*BITS bits) and writes BITS bytes. The last group of a row may hold fewer
// than 8 codes (the tail): it is packed into ceil(count * BITS / 8) bytes. Unpacking runs the
// same steps backwards. Threads are indexed with 64-bit integers (rows * groups may exceed
// 2**31), and a grid-stride loop covers any launch size.
//
// Arrays are C-contiguous uint8: codes (rows, n), packed (rows, ceil(n * BITS / 8)).
// Instantiated by NVRTC name expressions "pack_bits<BITS>" / "unpack_bits<BITS>".

typedef unsigned char uint8;
typedef unsigned long long uint64;

template <int BITS>
__device__ __forceinline__ uint64 squeeze_codes(uint64 word) {
    const uint64 byte_lanes = 0x00FF00FF00FF00FFull;
    const uint64 short_lanes = 0x0000FFFF0000FFFFull;
    const uint64 word_lanes = 0x00000000FFFFFFFFull;
    word = (word & byte_lanes) | ((word & ~byte_lanes) >> (8 - BITS));
    word = (word & short_lanes) | ((word & ~short_lanes) >> (16 - 2 * BITS));
    word = (word & word_lanes) | ((word & ~word_lanes) >> (32 - 4 * BITS));
    return word;
}

template <int BITS>
__device__ __forceinline__ uint64 spread_codes(uint64 word) {
    // masks of the low BITS, 2*BITS, 4*BITS bits of every 16-, 32- and 64-bit lane
    const uint64 low_1 = (1ull << BITS) - 1ull;
    const uint64 low_2 = (1ull << (2 * BITS)) - 1ull;
    const uint64 low_4 = (1ull << (4 * BITS)) - 1ull;
    const uint64 mask_16 = low_1 | (low_1 << 16) | (low_1 << 32) | (low_1 << 48);
    const uint64 mask_32 = low_2 | (low_2 << 32);
    const uint64 mask_64 = low_4;
    word = (word & mask_64) | ((word & ~mask_64) << (32 - 4 * BITS));
    word = (word & mask_32) | ((word & ~mask_32) << (16 - 2 * BITS));
    word = (word & mask_16) | ((word & ~mask_16) << (8 - BITS));
    return word;
}

template <int BITS>
__global__ void pack_bits(const uint8* __restrict__ codes, uint8* __restrict__ packed,
                          long long rows, long long n) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    const long long packed_length = (n * BITS + 7) / 8;
    const long long groups_per_row = (n + 7) / 8;
    const long long total = rows * groups_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / groups_per_row;
        const long long group = index - row * groups_per_row;
        const uint8* source = codes + row * n + group * 8;
        uint8* target = packed + row * packed_length + group * BITS;
        const long long remaining = n - group * 8;
        if (remaining >= 8) {
            uint64 word = 0;
            if (((uint64)source & 7ull) == 0) {
                word = *reinterpret_cast<const uint64*>(source);  // n % 8 == 0: always aligned
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) word |= (uint64)source[k] << (8 * k);
            }
            word = squeeze_codes<BITS>(word);
#pragma unroll
            for (int k = 0; k < BITS; ++k) target[k] = (uint8)(word >> (8 * k));
        } else {
            // tail: fewer than 8 codes, packed into ceil(remaining * BITS / 8) bytes
            const int count = (int)remaining;
            uint64 word = 0;
            for (int k = 0; k < count; ++k) word |= (uint64)source[k] << (BITS * k);
            const int length = (count * BITS + 7) / 8;
            for (int k = 0; k < length; ++k) target[k] = (uint8)(word >> (8 * k));
        }
    }
}

template <int BITS>
__global__ void unpack_bits(const uint8* __restrict__ packed, uint8* __restrict__ codes,
                            long long rows, long long n) {
    static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
    const long long packed_length = (n * BITS + 7) / 8;
    const long long groups_per_row = (n + 7) / 8;
    const long long total = rows * groups_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const uint64 code_mask = (1ull << BITS) - 1ull;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / groups_per_row;
        const long long group = index - row * groups_per_row;
        const uint8* source = packed + row * packed_length + group * BITS;
        uint8* target = codes + row * n + group * 8;
        const long long remaining = n - group * 8;
        if (remaining >= 8) {
            uint64 word = 0;
#pragma unroll
            for (int k = 0; k < BITS; ++k) word |= (uint64)source[k] << (8 * k);
            word = spread_codes<BITS>(word);
            if (((uint64)target & 7ull) == 0) {
                *reinterpret_cast<uint64*>(target) = word;  // n % 8 == 0: always aligned
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) target[k] = (uint8)(word >> (8 * k));
            }
        } else {
            const int count = (int)remaining;
            const int length = (count * BITS + 7) / 8;
            uint64 word = 0;
            for (int k = 0; k < length; ++k) word |= (uint64)source[k] << (8 * k);
            for (int k = 0; k < count; ++k) target[k] = (uint8)((word >> (BITS * k)) & code_mask);
        }
    }
}

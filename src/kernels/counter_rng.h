/* Counter-based random bits shared by the CUDA kernels (ops.cu) and checked against their Rust
 * twin (src/kernels/dropout.rs) by a unit test that compiles this header with the host C compiler.
 *
 * Element i of dropout call `key` keeps its value when bits(key, i) >= threshold, where
 *   bits(key, i) = high 32 bits of splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15),
 * the SplitMix64 output at position i of the stream that starts at `key`. The mask is a pure
 * function of (key, i): any element can be drawn by any thread, in any order, on any device. */
#ifndef MO_ALIGN_COUNTER_RNG_H
#define MO_ALIGN_COUNTER_RNG_H

#include <stdint.h>

#ifdef __CUDACC__
#define MO_FN __host__ __device__ __forceinline__
#else
#define MO_FN static inline
#endif

MO_FN uint32_t mo_counter_bits(uint64_t key, uint64_t index) {
    uint64_t z = key + (index + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (uint32_t)(z >> 32);
}

MO_FN int mo_dropout_keep(uint64_t key, uint64_t index, uint32_t threshold) {
    return mo_counter_bits(key, index) >= threshold;
}

#endif

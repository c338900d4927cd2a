// mo-align's own CUDA kernels, compiled to PTX by src/build.rs with `--features cuda` and
// loaded through candle's custom-kernel cache. Each kernel has a CPU twin in Rust that computes
// the same values (src/model/dropout.rs, src/train/optim.rs); the twins are what CI tests.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include "counter_rng.h"

// ---- inverted dropout: y = keep(key, i) ? x * scale : 0, masks drawn on the device ----------
#define MO_DROPOUT(NAME, T, TO_F, FROM_F)                                                      \
    extern "C" __global__ void NAME(const T *x, T *y, uint64_t n, uint64_t key,                \
                                    uint32_t threshold, float scale) {                         \
        for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;              \
             i += (uint64_t)blockDim.x * gridDim.x) {                                          \
            y[i] = mo_dropout_keep(key, i, threshold) ? FROM_F(TO_F(x[i]) * scale)             \
                                                      : FROM_F(0.0f);                          \
        }                                                                                      \
    }

__device__ __forceinline__ float mo_id(float v) { return v; }
MO_DROPOUT(mo_dropout_f32, float, mo_id, mo_id)
MO_DROPOUT(mo_dropout_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16)
MO_DROPOUT(mo_dropout_f16, __half, __half2float, __float2half)

extern "C" __global__ void mo_dropout_f64(const double *x, double *y, uint64_t n, uint64_t key,
                                          uint32_t threshold, float scale) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        y[i] = mo_dropout_keep(key, i, threshold) ? x[i] * (double)scale : 0.0;
    }
}

// ---- AdamW (torch.optim.AdamW's single-tensor arithmetic), f32 state ------------------------
// mv holds exp_avg in [0, n) and exp_avg_sq in [n, 2n); g is the raw gradient, multiplied by
// grad_scale (1 / loss scale, times the clipping factor) on the fly. The CPU twins are
// AdamMoments / AdamUpdate in src/train/optim.rs (same operation order; FMA contraction may
// differ in the last bit).
extern "C" __global__ void mo_adamw_moments(float *mv, const float *g, uint64_t n,
                                            float one_minus_beta1, float beta2,
                                            float one_minus_beta2, float grad_scale) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float gi = g[i] * grad_scale;
        float m = mv[i];
        float w = one_minus_beta1;
        mv[i] = w < 0.5f ? m + w * (gi - m) : gi - (gi - m) * (1.0f - w);
        mv[n + i] = mv[n + i] * beta2 + one_minus_beta2 * gi * gi;
    }
}

// w <- w * (1 - lr * wd) + (-lr / bc1) * m / (sqrt(v) / bc2_sqrt + eps)
extern "C" __global__ void mo_adamw_params(float *w, const float *mv, uint64_t n, float decay,
                                           float neg_step_size, float bc2_sqrt, float eps) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float denom = sqrtf(mv[n + i]) / bc2_sqrt + eps;
        w[i] = w[i] * decay + neg_step_size * mv[i] / denom;
    }
}

// mo-align's own CUDA kernels, compiled to PTX by src/build.rs with `--features cuda` and
// loaded through candle's custom-kernel cache. Each kernel has a CPU twin in Rust that computes
// the same values (src/kernels/dropout.rs, src/train/optim.rs); the twins are what CI tests.
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

// ---- the fused decoder (fused.cuh), instantiated for f32 and bf16 activations -------------
#include "fused.cuh"

#define MO_FUSED(SUF, T)                                                                          \
    extern "C" __global__ void mo_lora_down_##SUF(const T *x, T *u, MoGroup g) {                \
        mo_lora_down<T>(x, u, g);                                                                \
    }                                                                                            \
    extern "C" __global__ void mo_lora_up_bwd_##SUF(const T *dy, T *du, MoGroup g) {            \
        mo_lora_up_bwd<T>(dy, du, g);                                                            \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) mo_lora_grads_##SUF(                       \
        float *grads, const T *dy, const T *u, const T *du, const T *x, MoGroup g, int n) {      \
        mo_lora_grads<T>(grads, dy, u, du, x, g, n);                                             \
    }                                                                                            \
    extern "C" __global__ void mo_residual_norm_##SUF(const T *x, const T *y, const T *bias,    \
                                                      const T *u, const T *w, T *out, float eps, \
                                                      int n, int h, int add, MoGroup g) {        \
        mo_residual_norm<T>(x, y, bias, u, w, out, eps, n, h, add, g);                           \
    }                                                                                            \
    extern "C" __global__ void mo_norm_bwd_##SUF(const T *dy, const T *x, const T *w,           \
                                                 const T *res, const T *du, T *dx, float eps,    \
                                                 int h, MoGroup g) {                             \
        mo_norm_bwd<T>(dy, x, w, res, du, dx, eps, h, g);                                        \
    }                                                                                            \
    extern "C" __global__ void mo_qkv_##SUF(const T *y, const T *bias, const T *u,              \
                                            const float *cos_t, const float *sin_t,              \
                                            const unsigned int *positions, const T *qn,          \
                                            const T *kn, const T *grad, T *out, MoQkv p,         \
                                            MoGroup g) {                                         \
        mo_qkv<T, float>(y, bias, u, cos_t, sin_t, positions, qn, kn, grad, out, p, g);          \
    }                                                                                            \
    extern "C" __global__ void mo_swiglu_##SUF(const T *gu, const T *u, const T *dh,            \
                                               const T *du_down, T *out, int i_dim, MoGroup g,   \
                                               MoGroup down) {                                   \
        mo_swiglu<T>(gu, u, dh, du_down, out, i_dim, g, down);                                   \
    }                                                                                            \
    extern "C" __global__ void mo_attn_bwd_prep_##SUF(const T *dout, const T *o, const T *du,   \
                                                      T *dout_total, float *delta, MoAttn p,     \
                                                      int d, MoGroup g) {                        \
        mo_attn_bwd_prep<T>(dout, o, du, dout_total, delta, p, d, g);                            \
    }                                                                                            \
    extern "C" __global__ void mo_xent_row_##SUF(const float *logits,                            \
                                                 const unsigned int *targets, float *out,        \
                                                 long long stride, int h, T *probs, int v,       \
                                                 int grad) {                                     \
        mo_xent_row<T>(logits, targets, out, stride, h, probs, v, grad);                         \
    }

MO_FUSED(f32, float)
MO_FUSED(bf16, __nv_bfloat16)

#define MO_ATTN(SUF, T, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(MO_ATTN_THREADS)                                \
        mo_attn_fwd_##SUF##_d##D(const T *q, const T *k, const T *v,                             \
                                 const unsigned int *spans, T *o, float *lse, MoAttn p) {        \
        mo_attn_fwd<T, D>(q, k, v, spans, o, lse, p);                                            \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(MO_ATTN_THREADS)                                \
        mo_attn_bwd_dq_##SUF##_d##D(const T *q, const T *k, const T *v,                          \
                                    const unsigned int *spans, const T *dout, const float *lse,  \
                                    const float *delta, T *dq, MoAttn p) {                       \
        mo_attn_bwd_dq<T, D>(q, k, v, spans, dout, lse, delta, dq, p);                           \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(MO_ATTN_THREADS)                                \
        mo_attn_bwd_dkdv_##SUF##_d##D(const T *q, const T *k, const T *v,                        \
                                      const unsigned int *spans, const T *dout,                  \
                                      const float *lse, const float *delta, T *dk, T *dv,        \
                                      MoAttn p) {                                                \
        mo_attn_bwd_dkdv<T, D>(q, k, v, spans, dout, lse, delta, dk, dv, p);                     \
    }

#define MO_ATTN_DIMS(SUF, T) MO_ATTN(SUF, T, 16) MO_ATTN(SUF, T, 32) MO_ATTN(SUF, T, 64) MO_ATTN(SUF, T, 128)
MO_ATTN_DIMS(f32, float)
MO_ATTN_DIMS(bf16, __nv_bfloat16)

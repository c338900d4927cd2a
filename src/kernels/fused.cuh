// The fused decoder's kernels (included by ops.cu). Each has a CPU twin in src/kernels/*.rs
// that computes the same values in the same order where it matters; tests/cuda.rs compares
// them. Activations are T (float or __nv_bfloat16), adapters, gradients, statistics f32.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>
#include "counter_rng.h"

// -inf without math.h (NVRTC and strict toolchains lack the host macro).
#define MO_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float mo_ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float mo_ld(const __nv_bfloat16 *p, size_t i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void mo_st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void mo_st(__nv_bfloat16 *p, size_t i, float v) {
    p[i] = __float2bfloat16(v);
}
// The value `v` takes once stored as T (bf16 rounding), so sums see what the buffer holds.
__device__ __forceinline__ float mo_round(float v, const float *) { return v; }
__device__ __forceinline__ float mo_round(float v, const __nv_bfloat16 *) {
    return __bfloat162float(__float2bfloat16(v));
}

__device__ __forceinline__ float mo_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
__device__ __forceinline__ float mo_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float mo_block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = mo_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return mo_warp_sum(t);
}
__device__ float mo_block_max(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = mo_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : MO_NEG_INF;
    return mo_warp_max(t);
}

// ---- LoRA groups --------------------------------------------------------------------------
// One group is the adapters of the projections that share an input (q/k/v, o, gate/up,
// down). Mirrors `kernels::cuda::Group` (repr(C)).
#define MO_MAX_ADAPTERS 4
#define MO_MAX_RANK 32
struct MoAdapter {
    const float *a;     // [r, in]
    const float *b;     // [out, r]
    const float *gate;  // [r] or null
    unsigned long long key;
    unsigned int threshold;
    int has_mask;
    float keep;   // 1 / (1 - p)
    float scale;  // alpha / r
    int r, u_off, out_off, out;
    unsigned long long grad_a, grad_b;  // element offsets in the flat gradient buffer
};
struct MoGroup {
    MoAdapter ad[MO_MAX_ADAPTERS];
    int n;      // adapters
    int inp;    // input features
    int sum_r;  // width of u
    int width;  // output features of the whole group
};

__device__ __forceinline__ float mo_rank_scale(const MoAdapter &a, int j) {
    return a.gate ? a.scale * a.gate[j] : a.scale;
}
// Dropout factor of input element (row, c) for adapter a: 0 or 1 / (1 - p).
__device__ __forceinline__ float mo_keep(const MoAdapter &a, int inp, long long row, int c) {
    if (!a.has_mask) return 1.0f;
    return mo_dropout_keep(a.key, (uint64_t)(row * inp + c), a.threshold) ? a.keep : 0.0f;
}
// sum_j u[j] B[c_local, j] for output column `col` of the group (0 when no adapter covers it).
__device__ __forceinline__ float mo_lora_up(const MoGroup &g, const float *u_row, int col) {
    for (int i = 0; i < g.n; i++) {
        const MoAdapter &a = g.ad[i];
        int c = col - a.out_off;
        if (c >= 0 && c < a.out) {
            float s = 0.0f;
            const float *brow = a.b + (size_t)c * a.r;
            for (int j = 0; j < a.r; j++) s += u_row[a.u_off + j] * brow[j];
            return s;
        }
    }
    return 0.0f;
}
// sum_i drop_i(du_i A_i)[c]: the input gradient through the adapters at input column c.
__device__ __forceinline__ float mo_lora_dx(const MoGroup &g, const float *du_row, long long row,
                                            int c) {
    float total = 0.0f;
    for (int i = 0; i < g.n; i++) {
        const MoAdapter &a = g.ad[i];
        float k = mo_keep(a, g.inp, row, c);
        if (k == 0.0f) continue;
        float s = 0.0f;
        for (int j = 0; j < a.r; j++) s += du_row[a.u_off + j] * a.a[(size_t)j * g.inp + c];
        total += s * k;
    }
    return total;
}
// Loads row `row` of a [n, sum_r] T buffer into shared floats.
template <typename T>
__device__ __forceinline__ void mo_load_row(float *dst, const T *src, long long row, int len) {
    for (int j = threadIdx.x; j < len; j += blockDim.x) dst[j] = mo_ld(src, (size_t)row * len + j);
}

// u[row, u_off + j] = s_j * sum_c A[j, c] drop(x[row, c]). One block per row; the dropped
// row is staged in shared memory (MO_DOWN_CHUNK columns at a time, so any width fits the
// default 48 KiB) per adapter, one warp per output, partial sums kept across chunks.
#define MO_DOWN_CHUNK 4096
template <typename T>
__device__ void mo_lora_down(const T *x, T *u, MoGroup g) {
    extern __shared__ float sm[];
    long long row = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int i = 0; i < g.n; i++) {
        const MoAdapter &a = g.ad[i];
        // Outputs j = warp, warp + warps, ...: at most MO_MAX_RANK / 1 per warp.
        float part[MO_MAX_RANK];
        for (int q = 0; q < MO_MAX_RANK; q++) part[q] = 0.0f;
        for (int c0 = 0; c0 < g.inp; c0 += MO_DOWN_CHUNK) {
            int len = min(MO_DOWN_CHUNK, g.inp - c0);
            __syncthreads();
            for (int c = threadIdx.x; c < len; c += blockDim.x) {
                float v = mo_ld(x, (size_t)row * g.inp + c0 + c);
                float k = mo_keep(a, g.inp, row, c0 + c);
                sm[c] = k == 0.0f ? 0.0f : v * k;
            }
            __syncthreads();
            for (int j = warp, q = 0; j < a.r; j += warps, q++) {
                const float *arow = a.a + (size_t)j * g.inp + c0;
                float s = 0.0f;
                for (int c = lane; c < len; c += 32) s += arow[c] * sm[c];
                part[q] += s;
            }
        }
        for (int j = warp, q = 0; j < a.r; j += warps, q++) {
            float s = mo_warp_sum(part[q]);
            if (lane == 0) mo_st(u, (size_t)row * g.sum_r + a.u_off + j, s * mo_rank_scale(a, j));
        }
    }
}

// du[row, u_off + j] = s_j * sum_c dy[row, out_off + c] B[c, j]. One block per row, one warp
// per output.
template <typename T>
__device__ void mo_lora_up_bwd(const T *dy, T *du, MoGroup g) {
    long long row = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int i = 0; i < g.n; i++) {
        const MoAdapter &a = g.ad[i];
        for (int j = warp; j < a.r; j += warps) {
            float s = 0.0f;
            for (int c = lane; c < a.out; c += 32)
                s += mo_ld(dy, (size_t)row * g.width + a.out_off + c) * a.b[(size_t)c * a.r + j];
            s = mo_warp_sum(s);
            if (lane == 0) mo_st(du, (size_t)row * g.sum_r + a.u_off + j, s * mo_rank_scale(a, j));
        }
    }
}

// Gradient reductions over all rows, one launch, deterministic (fixed order, no atomics):
//   B job: dB[c, j] += sum_row dy[row, out_off + c] u[row, u_off + j]
//   A job: dA[j, c] += sum_row du[row, u_off + j] drop(x[row, c])
// Block = 32 columns x 8 row lanes; grid = every job's column tiles.
template <typename T>
__device__ void mo_lora_grads(float *grads, const T *dy, const T *u, const T *du, const T *x,
                              MoGroup g, int n) {
    __shared__ float red[8][32][MO_MAX_RANK + 1];
    int tile = blockIdx.x;
    int job_adapter = -1, is_a = 0, c0 = 0;
    for (int i = 0; i < g.n && job_adapter < 0; i++) {
        int tb = (g.ad[i].out + 31) / 32, ta = (g.inp + 31) / 32;
        if (tile < tb) { job_adapter = i; is_a = 0; c0 = tile * 32; break; }
        tile -= tb;
        if (tile < ta) { job_adapter = i; is_a = 1; c0 = tile * 32; break; }
        tile -= ta;
    }
    if (job_adapter < 0) return;
    const MoAdapter &a = g.ad[job_adapter];
    int cl = threadIdx.x & 31, rl = threadIdx.x >> 5;
    int c = c0 + cl;
    int cols = is_a ? g.inp : a.out;
    float acc[MO_MAX_RANK];
    for (int j = 0; j < MO_MAX_RANK; j++) acc[j] = 0.0f;
    if (c < cols) {
        for (long long row = rl; row < n; row += 8) {
            if (is_a) {
                float k = mo_keep(a, g.inp, row, c);
                if (k == 0.0f) continue;
                float xv = mo_ld(x, (size_t)row * g.inp + c) * k;
                for (int j = 0; j < a.r; j++)
                    acc[j] += mo_ld(du, (size_t)row * g.sum_r + a.u_off + j) * xv;
            } else {
                float yv = mo_ld(dy, (size_t)row * g.width + a.out_off + c);
                for (int j = 0; j < a.r; j++)
                    acc[j] += yv * mo_ld(u, (size_t)row * g.sum_r + a.u_off + j);
            }
        }
    }
    for (int j = 0; j < a.r; j++) red[rl][cl][j] = acc[j];
    __syncthreads();
    for (int idx = threadIdx.x; idx < 32 * a.r; idx += blockDim.x) {
        int ocl = idx / a.r, j = idx % a.r, oc = c0 + ocl;
        if (oc >= cols) continue;
        float s = 0.0f;
        for (int q = 0; q < 8; q++) s += red[q][ocl][j];
        if (is_a)
            grads[a.grad_a + (size_t)j * g.inp + oc] += s;
        else
            grads[a.grad_b + (size_t)oc * a.r + j] += s;
    }
}

// ---- RMSNorm and the residual epilogue ----------------------------------------------------
// out[0] = x + y + bias + lora (the new residual), out[1] = w * xhat of it; without y
// (`add` 0) out is just w * xhat of x. One block per row.
template <typename T>
__device__ void mo_residual_norm(const T *x, const T *y, const T *bias, const T *u, const T *w,
                                 T *out, float eps, int n, int h, int add, MoGroup g) {
    extern __shared__ float sm[];  // u row [sum_r], reduction scratch [32]
    float *urow = sm, *scratch = sm + g.sum_r;
    long long row = blockIdx.x;
    if (add && g.n > 0) mo_load_row(urow, u, row, g.sum_r);
    __syncthreads();
    T *res = out, *normed = add ? out + (size_t)n * h : out;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float v = mo_ld(x, (size_t)row * h + c);
        if (add) {
            float t = mo_ld(y, (size_t)row * h + c);
            if (bias) t += mo_ld(bias, c);
            if (g.n > 0) t += mo_lora_up(g, urow, c);
            v = mo_round(v + mo_round(t, x), x);
            mo_st(res, (size_t)row * h + c, v);
        }
        ss += v * v;
    }
    float inv = rsqrtf(mo_block_sum(ss, scratch) / h + eps);
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float v = add ? mo_ld(res, (size_t)row * h + c) : mo_ld(x, (size_t)row * h + c);
        mo_st(normed, (size_t)row * h + c, v * inv * mo_ld(w, c));
    }
}

// dx = res + (g w - xhat mean(g w xhat)) / rms, g = dy + sum_i drop_i(du_i A_i).
template <typename T>
__device__ void mo_norm_bwd(const T *dy, const T *x, const T *w, const T *res, const T *du,
                            T *dx, float eps, int h, MoGroup g) {
    extern __shared__ float sm[];  // g row [h], du row [sum_r], scratch [32]
    float *grow = sm, *durow = sm + h, *scratch = sm + h + g.sum_r;
    long long row = blockIdx.x;
    if (g.n > 0) mo_load_row(durow, du, row, g.sum_r);
    __syncthreads();
    float ss = 0.0f, dot = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float gv = mo_ld(dy, (size_t)row * h + c);
        if (g.n > 0) gv += mo_lora_dx(g, durow, row, c);
        float xv = mo_ld(x, (size_t)row * h + c), wv = mo_ld(w, c);
        grow[c] = gv * wv;
        ss += xv * xv;
        dot += gv * wv * xv;
    }
    ss = mo_block_sum(ss, scratch);
    dot = mo_block_sum(dot, scratch);
    float inv = rsqrtf(ss / h + eps);
    float proj = dot * inv / h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float xv = mo_ld(x, (size_t)row * h + c);
        float v = (grow[c] - xv * inv * proj) * inv;
        if (res) v += mo_ld(res, (size_t)row * h + c);
        mo_st(dx, (size_t)row * h + c, v);
    }
}

// ---- the attention-input epilogue -------------------------------------------------------
struct MoQkv {
    int batch, seq, heads, kv_heads, head_dim, width, has_norm;
    float eps, q_scale;
};

// Head `hh` of the concatenation: its projection column, output base and kind (0 q, 1 k, 2 v).
__device__ __forceinline__ void mo_qkv_head(const MoQkv &p, int hh, int *col, long long *base,
                                            int *kind, int *heads, int *idx) {
    long long n = (long long)p.batch * p.seq;
    int d = p.head_dim;
    if (hh < p.heads) {
        *kind = 0; *idx = hh; *heads = p.heads; *col = hh * d; *base = 0;
    } else if (hh < p.heads + p.kv_heads) {
        *kind = 1; *idx = hh - p.heads; *heads = p.kv_heads; *col = (p.heads + *idx) * d;
        *base = n * p.heads * d;
    } else {
        *kind = 2; *idx = hh - p.heads - p.kv_heads; *heads = p.kv_heads;
        *col = (p.heads + p.kv_heads + *idx) * d; *base = n * (p.heads + p.kv_heads) * d;
    }
}

// Forward (grad == null): y + bias + lora -> (norm) -> rope -> (scale) -> [B, heads, T, d].
// Backward (grad != null): the inverse, written to out [n, width]. One block per row, one warp
// per head at a time.
template <typename T, typename C>
__device__ void mo_qkv(const T *y, const T *bias, const T *u, const C *cos_t, const C *sin_t,
                       const unsigned int *positions, const T *qn, const T *kn, const T *grad,
                       T *out, MoQkv p, MoGroup g) {
    extern __shared__ float sm[];  // u row [sum_r], per warp: x [d], g [d]
    long long row = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int d = p.head_dim, half = d / 2;
    float *urow = sm, *xb = sm + g.sum_r + warp * 2 * d, *gb = xb + d;
    if (g.n > 0) mo_load_row(urow, u, row, g.sum_r);
    __syncthreads();
    long long b = row / p.seq, t = row % p.seq;
    unsigned int pos = positions[row];
    for (int hh = warp; hh < p.heads + 2 * p.kv_heads; hh += warps) {
        int col, kind, heads, idx;
        long long base;
        mo_qkv_head(p, hh, &col, &base, &kind, &heads, &idx);
        long long at = base + (((long long)b * heads + idx) * p.seq + t) * d;
        for (int e = lane; e < d; e += 32) {
            float v = mo_ld(y, (size_t)row * p.width + col + e);
            if (bias) v += mo_ld(bias, col + e);
            if (g.n > 0) v += mo_lora_up(g, urow, col + e);
            xb[e] = v;
        }
        __syncwarp();
        const T *nw = kind == 0 ? qn : kn;
        bool norm = p.has_norm && kind != 2;
        float inv = 1.0f;
        if (norm) {
            float ss = 0.0f;
            for (int e = lane; e < d; e += 32) ss += xb[e] * xb[e];
            inv = rsqrtf(mo_warp_sum(ss) / d + p.eps);
        }
        float k = kind == 0 ? p.q_scale : 1.0f;
        if (!grad) {
            if (norm) {
                for (int e = lane; e < d; e += 32) xb[e] = xb[e] * inv * mo_ld(nw, e);
                __syncwarp();
            }
            if (kind == 2) {
                for (int e = lane; e < d; e += 32) mo_st(out, at + e, xb[e]);
            } else {
                for (int i = lane; i < half; i += 32) {
                    float c = (float)cos_t[(size_t)pos * half + i],
                          s = (float)sin_t[(size_t)pos * half + i];
                    float x1 = xb[i], x2 = xb[i + half];
                    mo_st(out, at + i, (x1 * c - x2 * s) * k);
                    mo_st(out, at + i + half, (x2 * c + x1 * s) * k);
                }
            }
        } else {
            if (kind == 2) {
                for (int e = lane; e < d; e += 32)
                    mo_st(out, (size_t)row * p.width + col + e, mo_ld(grad, at + e));
            } else {
                for (int i = lane; i < half; i += 32) {
                    float c = (float)cos_t[(size_t)pos * half + i],
                          s = (float)sin_t[(size_t)pos * half + i];
                    float g1 = mo_ld(grad, at + i) * k, g2 = mo_ld(grad, at + i + half) * k;
                    gb[i] = g1 * c + g2 * s;
                    gb[i + half] = g2 * c - g1 * s;
                }
                __syncwarp();
                if (norm) {
                    float dot = 0.0f;
                    for (int e = lane; e < d; e += 32) dot += gb[e] * mo_ld(nw, e) * xb[e] * inv;
                    float proj = mo_warp_sum(dot) / d;
                    for (int e = lane; e < d; e += 32)
                        mo_st(out, (size_t)row * p.width + col + e,
                              (gb[e] * mo_ld(nw, e) - xb[e] * inv * proj) * inv);
                } else {
                    for (int e = lane; e < d; e += 32)
                        mo_st(out, (size_t)row * p.width + col + e, gb[e]);
                }
            }
        }
        __syncwarp();
    }
}

// ---- SwiGLU epilogue ----------------------------------------------------------------------
// Forward: h = silu(g) u with g, u the gate|up GEMM output plus the adapters. Backward (dh !=
// null): out = [dg | du] from dh + the down adapters' input gradient (group `down`).
template <typename T>
__device__ void mo_swiglu(const T *gu, const T *u, const T *dh, const T *du_down, T *out, int i_dim,
                          MoGroup g, MoGroup down) {
    extern __shared__ float sm[];  // u row [g.sum_r], down du row [down.sum_r]
    long long row = blockIdx.x;
    float *urow = sm, *drow = sm + g.sum_r;
    if (g.n > 0) mo_load_row(urow, u, row, g.sum_r);
    if (dh && down.n > 0) mo_load_row(drow, du_down, row, down.sum_r);
    __syncthreads();
    for (int c = threadIdx.x; c < i_dim; c += blockDim.x) {
        float a = mo_ld(gu, (size_t)row * 2 * i_dim + c);
        float b = mo_ld(gu, (size_t)row * 2 * i_dim + i_dim + c);
        if (g.n > 0) {
            a += mo_lora_up(g, urow, c);
            b += mo_lora_up(g, urow, i_dim + c);
        }
        float sig = 1.0f / (1.0f + __expf(-a));
        if (!dh) {
            mo_st(out, (size_t)row * i_dim + c, a * sig * b);
        } else {
            float d = mo_ld(dh, (size_t)row * i_dim + c);
            if (down.n > 0) d += mo_lora_dx(down, drow, row, c);
            float dsilu = sig * (a * (1.0f - sig) + 1.0f);
            mo_st(out, (size_t)row * 2 * i_dim + c, d * b * dsilu);
            mo_st(out, (size_t)row * 2 * i_dim + i_dim + c, d * (a * sig));
        }
    }
}

// ---- attention over spans -----------------------------------------------------------------
struct MoSpan {
    unsigned int start, end, seg1, seg2;
};
__device__ __forceinline__ unsigned int mo_seg(const MoSpan &s, long long x) {
    return (x >= (long long)s.seg1) + (x >= (long long)s.seg2);
}
__device__ __forceinline__ bool mo_visible(const MoSpan &s, long long qi, long long j) {
    return j <= qi && j >= (long long)s.start && j < (long long)s.end &&
           (j < (long long)s.seg1 || mo_seg(s, j) == mo_seg(s, qi));
}
__device__ __forceinline__ MoSpan mo_span(const unsigned int *spans, int b) {
    MoSpan s;
    s.start = spans[4 * b]; s.end = spans[4 * b + 1];
    s.seg1 = spans[4 * b + 2]; s.seg2 = spans[4 * b + 3];
    return s;
}

struct MoAttn {
    int batch, heads, kv_heads, seq, keys, past;
};

// Threads per row: TPR threads share one query (or key) row, DPT = D / TPR dims each.
#define MO_ATTN_THREADS 128
#define MO_ATTN_TILE 32

// Forward: one thread group per query row, key tiles streamed through shared memory with an
// online softmax. o [B, T, heads * D] (T dtype), lse [B, heads, T] f32.
template <typename T, int D>
__device__ void mo_attn_fwd(const T *q, const T *k, const T *v, const unsigned int *spans, T *o,
                            float *lse, MoAttn p) {
    constexpr int TPR = D >= 32 ? D / 32 : 1, DPT = D / TPR, ROWS = MO_ATTN_THREADS / TPR;
    __shared__ float ks[MO_ATTN_TILE][D], vs[MO_ATTN_TILE][D];
    int b = blockIdx.z, h = blockIdx.y, g = h / (p.heads / p.kv_heads);
    int rloc = threadIdx.x / TPR, part = threadIdx.x % TPR;
    long long i = (long long)blockIdx.x * ROWS + rloc;
    bool live = i < p.seq;
    MoSpan sp = mo_span(spans, b);
    long long qi = p.past + i;
    float qr[DPT], acc[DPT];
    const T *qrow = q + (((long long)b * p.heads + h) * p.seq + (live ? i : 0)) * D + part * DPT;
    for (int e = 0; e < DPT; e++) { qr[e] = live ? mo_ld(qrow, e) : 0.0f; acc[e] = 0.0f; }
    float m = MO_NEG_INF, l = 0.0f;
    long long last_q = p.past + min((long long)(blockIdx.x + 1) * ROWS, (long long)p.seq) - 1;
    long long kmax = min(min(last_q, (long long)sp.end - 1), (long long)p.keys - 1);
    const T *kb = k + ((long long)b * p.kv_heads + g) * p.keys * D;
    const T *vb = v + ((long long)b * p.kv_heads + g) * p.keys * D;
    for (long long j0 = sp.start / MO_ATTN_TILE * MO_ATTN_TILE; j0 <= kmax; j0 += MO_ATTN_TILE) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < MO_ATTN_TILE * D; idx += blockDim.x) {
            int jj = idx / D, e = idx % D;
            long long j = j0 + jj;
            ks[jj][e] = j < p.keys ? mo_ld(kb, j * D + e) : 0.0f;
            vs[jj][e] = j < p.keys ? mo_ld(vb, j * D + e) : 0.0f;
        }
        __syncthreads();
        for (int jj = 0; jj < MO_ATTN_TILE; jj++) {
            long long j = j0 + jj;
            float s = 0.0f;
            for (int e = 0; e < DPT; e++) s += qr[e] * ks[jj][part * DPT + e];
            for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (!live || j >= p.keys || !mo_visible(sp, qi, j)) continue;
            float mn = fmaxf(m, s);
            float corr = __expf(m - mn), e_s = __expf(s - mn);
            l = l * corr + e_s;
            for (int e = 0; e < DPT; e++) acc[e] = acc[e] * corr + e_s * vs[jj][part * DPT + e];
            m = mn;
        }
    }
    if (!live) return;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T *orow = o + (((long long)b * p.seq + i) * p.heads + h) * D + part * DPT;
    for (int e = 0; e < DPT; e++) mo_st(orow, e, acc[e] * inv);
    if (part == 0) lse[((long long)b * p.heads + h) * p.seq + i] = l > 0.0f ? m + __logf(l) : MO_NEG_INF;
}

// Backward, step 1 (one block per token row): dO += the o-projection adapters' input
// gradient (written to dout_total), and delta = rowsum(dO * O) per head.
template <typename T>
__device__ void mo_attn_bwd_prep(const T *dout, const T *o, const T *du, T *dout_total,
                                 float *delta, MoAttn p, int d, MoGroup g) {
    extern __shared__ float sm[];  // du row [sum_r], products [heads * d]
    float *durow = sm, *prod = sm + g.sum_r;
    long long row = blockIdx.x;
    int width = p.heads * d;
    if (g.n > 0) mo_load_row(durow, du, row, g.sum_r);
    __syncthreads();
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float gv = mo_ld(dout, (size_t)row * width + c);
        if (g.n > 0) gv += mo_lora_dx(g, durow, row, c);
        gv = mo_round(gv, dout);
        mo_st(dout_total, (size_t)row * width + c, gv);
        prod[c] = gv * mo_ld(o, (size_t)row * width + c);
    }
    __syncthreads();
    long long b = row / p.seq, t = row % p.seq;
    for (int h = threadIdx.x; h < p.heads; h += blockDim.x) {
        float s = 0.0f;
        for (int e = 0; e < d; e++) s += prod[h * d + e];
        delta[((long long)b * p.heads + h) * p.seq + t] = s;
    }
}

// Backward, step 2: dQ = dS K per query row, key tiles streamed.
template <typename T, int D>
__device__ void mo_attn_bwd_dq(const T *q, const T *k, const T *v, const unsigned int *spans,
                               const T *dout, const float *lse, const float *delta, T *dq,
                               MoAttn p) {
    constexpr int TPR = D >= 32 ? D / 32 : 1, DPT = D / TPR, ROWS = MO_ATTN_THREADS / TPR;
    __shared__ float ks[MO_ATTN_TILE][D], vs[MO_ATTN_TILE][D];
    int b = blockIdx.z, h = blockIdx.y, g = h / (p.heads / p.kv_heads);
    int rloc = threadIdx.x / TPR, part = threadIdx.x % TPR;
    long long i = (long long)blockIdx.x * ROWS + rloc;
    bool live = i < p.seq;
    MoSpan sp = mo_span(spans, b);
    long long qi = p.past + i, bh = (long long)b * p.heads + h;
    float qr[DPT], dor[DPT], acc[DPT];
    long long ii = live ? i : 0;
    for (int e = 0; e < DPT; e++) {
        qr[e] = live ? mo_ld(q, (bh * p.seq + ii) * D + part * DPT + e) : 0.0f;
        dor[e] = live ? mo_ld(dout, (((long long)b * p.seq + ii) * p.heads + h) * D + part * DPT + e) : 0.0f;
        acc[e] = 0.0f;
    }
    float l = live ? lse[bh * p.seq + i] : 0.0f, dl = live ? delta[bh * p.seq + i] : 0.0f;
    long long last_q = p.past + min((long long)(blockIdx.x + 1) * ROWS, (long long)p.seq) - 1;
    long long kmax = min(min(last_q, (long long)sp.end - 1), (long long)p.keys - 1);
    const T *kb = k + ((long long)b * p.kv_heads + g) * p.keys * D;
    const T *vb = v + ((long long)b * p.kv_heads + g) * p.keys * D;
    for (long long j0 = sp.start / MO_ATTN_TILE * MO_ATTN_TILE; j0 <= kmax; j0 += MO_ATTN_TILE) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < MO_ATTN_TILE * D; idx += blockDim.x) {
            int jj = idx / D, e = idx % D;
            long long j = j0 + jj;
            ks[jj][e] = j < p.keys ? mo_ld(kb, j * D + e) : 0.0f;
            vs[jj][e] = j < p.keys ? mo_ld(vb, j * D + e) : 0.0f;
        }
        __syncthreads();
        for (int jj = 0; jj < MO_ATTN_TILE; jj++) {
            long long j = j0 + jj;
            float s = 0.0f, dp = 0.0f;
            for (int e = 0; e < DPT; e++) {
                s += qr[e] * ks[jj][part * DPT + e];
                dp += dor[e] * vs[jj][part * DPT + e];
            }
            for (int off = TPR / 2; off > 0; off >>= 1) {
                s += __shfl_xor_sync(0xffffffffu, s, off);
                dp += __shfl_xor_sync(0xffffffffu, dp, off);
            }
            if (!live || j >= p.keys || !mo_visible(sp, qi, j)) continue;
            float ds = __expf(s - l) * (dp - dl);
            for (int e = 0; e < DPT; e++) acc[e] += ds * ks[jj][part * DPT + e];
        }
    }
    if (!live) return;
    for (int e = 0; e < DPT; e++) mo_st(dq, (bh * p.seq + i) * D + part * DPT + e, acc[e]);
}

// Backward, step 3: dK, dV per key row, query tiles (of every head of the group) streamed.
template <typename T, int D>
__device__ void mo_attn_bwd_dkdv(const T *q, const T *k, const T *v, const unsigned int *spans,
                                 const T *dout, const float *lse, const float *delta, T *dk,
                                 T *dv, MoAttn p) {
    constexpr int TPR = D >= 32 ? D / 32 : 1, DPT = D / TPR, ROWS = MO_ATTN_THREADS / TPR;
    __shared__ float qs[MO_ATTN_TILE][D], ds_[MO_ATTN_TILE][D];
    __shared__ float ls[MO_ATTN_TILE], dls[MO_ATTN_TILE];
    int b = blockIdx.z, g = blockIdx.y, rep = p.heads / p.kv_heads;
    int rloc = threadIdx.x / TPR, part = threadIdx.x % TPR;
    long long j = (long long)blockIdx.x * ROWS + rloc;
    bool live = j < p.keys;
    MoSpan sp = mo_span(spans, b);
    long long bg = (long long)b * p.kv_heads + g, jj_ = live ? j : 0;
    float kr[DPT], vr[DPT], dka[DPT], dva[DPT];
    for (int e = 0; e < DPT; e++) {
        kr[e] = live ? mo_ld(k, (bg * p.keys + jj_) * D + part * DPT + e) : 0.0f;
        vr[e] = live ? mo_ld(v, (bg * p.keys + jj_) * D + part * DPT + e) : 0.0f;
        dka[e] = 0.0f; dva[e] = 0.0f;
    }
    long long first_key = (long long)blockIdx.x * ROWS;
    // Queries at key index < first_key see none of this block's keys.
    long long i_start = max(0LL, first_key - p.past) / MO_ATTN_TILE * MO_ATTN_TILE;
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        long long bh = (long long)b * p.heads + h;
        for (long long i0 = i_start; i0 < p.seq; i0 += MO_ATTN_TILE) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < MO_ATTN_TILE * D; idx += blockDim.x) {
                int r = idx / D, e = idx % D;
                long long i = i0 + r;
                qs[r][e] = i < p.seq ? mo_ld(q, (bh * p.seq + i) * D + e) : 0.0f;
                ds_[r][e] = i < p.seq ? mo_ld(dout, (((long long)b * p.seq + i) * p.heads + h) * D + e) : 0.0f;
            }
            for (int r = threadIdx.x; r < MO_ATTN_TILE; r += blockDim.x) {
                long long i = i0 + r;
                ls[r] = i < p.seq ? lse[bh * p.seq + i] : 0.0f;
                dls[r] = i < p.seq ? delta[bh * p.seq + i] : 0.0f;
            }
            __syncthreads();
            for (int r = 0; r < MO_ATTN_TILE; r++) {
                long long i = i0 + r;
                float s = 0.0f, dp = 0.0f;
                for (int e = 0; e < DPT; e++) {
                    s += qs[r][part * DPT + e] * kr[e];
                    dp += ds_[r][part * DPT + e] * vr[e];
                }
                for (int off = TPR / 2; off > 0; off >>= 1) {
                    s += __shfl_xor_sync(0xffffffffu, s, off);
                    dp += __shfl_xor_sync(0xffffffffu, dp, off);
                }
                if (!live || i >= p.seq || !mo_visible(sp, p.past + i, j)) continue;
                float pr = __expf(s - ls[r]);
                float dsv = pr * (dp - dls[r]);
                for (int e = 0; e < DPT; e++) {
                    dva[e] += pr * ds_[r][part * DPT + e];
                    dka[e] += dsv * qs[r][part * DPT + e];
                }
            }
        }
    }
    if (!live) return;
    for (int e = 0; e < DPT; e++) {
        mo_st(dk, (bg * p.keys + j) * D + part * DPT + e, dka[e]);
        mo_st(dv, (bg * p.keys + j) * D + part * DPT + e, dva[e]);
    }
}

// ---- the LM head's row kernel ---------------------------------------------------------------
// logits [C, V] f32 (one row per block): logp written to out[i * stride + h]; with `grad` the
// row's softmax - onehot goes to probs [C, V] (T, the GEMM operand of the backward product).
template <typename T>
__device__ void mo_xent_row(const float *logits, const unsigned int *targets, float *out,
                            long long stride, int h, T *probs, int v, int grad) {
    __shared__ float scratch[32];
    long long i = blockIdx.x;
    const float *x = logits + i * v;
    float m = MO_NEG_INF;
    for (int c = threadIdx.x; c < v; c += blockDim.x) m = fmaxf(m, x[c]);
    m = mo_block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < v; c += blockDim.x) s += __expf(x[c] - m);
    s = mo_block_sum(s, scratch);
    float lse = m + __logf(s);
    unsigned int t = targets[i];
    if (threadIdx.x == 0) out[i * stride + h] = x[t] - lse;
    if (!grad) return;
    for (int c = threadIdx.x; c < v; c += blockDim.x)
        mo_st(probs, (size_t)i * v + c, __expf(x[c] - lse) - (c == (int)t ? 1.0f : 0.0f));
}

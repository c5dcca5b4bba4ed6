// The opt-in CUDA forms of the model's fused ops (engine/src/cuda/fused.rs launches them,
// only with WHET_CUDA_KERNELS=1): attention, RMSNorm (with the residual add), RoPE, SwiGLU,
// the embedding's backward, cross-entropy over a chunk of logits rows, and the MoE grouped
// matmuls. Each computes what its composed candle form (engine/src/ops) computes: inputs in
// f32 or bf16, every sum in f32, a result rounded to the input dtype where the composed form
// rounds it. Plain SIMT code (no tensor-core instructions), so one fatbin serves sm_80/sm_90.

#include <cstdint>
#include <cuda_bf16.h>
#include <math_constants.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// v rounded to T's precision (what the composed form holds between two ops), as an f32.
template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_to<bf16>(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// =============================================================================================
// Attention (ops::causal_attention): q (batch, heads, seq, HD), k and v (batch, kv_heads, seq,
// HD), query head h reading kv head h / (heads / kv_heads) in place (no repeated K/V); out
// (batch, seq, heads * HD). Query i sees key j when j <= i and real_keys[b, j]; a row that sees
// no key averages all seq values (transformers' eager result) and gets lse = +inf.
//
// FlashAttention-2's schedule in SIMT form: a block owns ROWS query rows; HD / 32 threads share
// a row, thread g holding dims g, g + G, ... (so a warp's reads of a shared key row hit distinct
// banks); key tiles of TILE rows go through shared memory, and each row keeps its running max,
// sum and output (online softmax). The backward recomputes p = exp(s - lse) from the saved
// log-sum-exp: one kernel accumulates dq per query row, another dk and dv per key row.

constexpr int ATT_ROWS = 32;
constexpr int ATT_TILE = 32;

// The dot product of a row split over the G threads that share it, on all of them.
template <int G> __device__ __forceinline__ float group_sum(float v) {
    for (int offset = G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

template <typename T, int HD>
__device__ void attention_forward(const T* q, const T* k, const T* v, const uint8_t* real_keys,
                                  int heads, int kv_heads, int seq, float scale, T* out,
                                  float* lse) {
    constexpr int G = HD / 32, DPT = 32;
    __shared__ float ks[ATT_TILE][HD];
    __shared__ float vs[ATT_TILE][HD];
    __shared__ uint8_t real_s[ATT_TILE];
    const int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int g = threadIdx.x % G, q0 = blockIdx.x * ATT_ROWS;
    const int i = q0 + threadIdx.x / G;
    const bool active = i < seq;
    const size_t q_at = ((size_t)(b * heads + h) * seq + (active ? i : 0)) * HD;
    const size_t kv_at = (size_t)(b * kv_heads + kvh) * seq * HD;
    float qr[DPT], acc[DPT];
#pragma unroll
    for (int x = 0; x < DPT; ++x) {
        qr[x] = active ? load(q, q_at + x * G + g) : 0.f;
        acc[x] = 0.f;
    }
    float m = -CUDART_INF_F, l = 0.f;
    const uint8_t* real = real_keys + (size_t)b * seq;
    const int key_end = min(seq, q0 + ATT_ROWS);  // keys past the block's last row: hidden
    for (int k0 = 0; k0 < key_end; k0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * HD; e += blockDim.x) {
            const int j = e / HD, d = e % HD, key = k0 + j;
            ks[j][d] = key < seq ? load(k, kv_at + (size_t)key * HD + d) : 0.f;
            vs[j][d] = key < seq ? load(v, kv_at + (size_t)key * HD + d) : 0.f;
        }
        for (int j = threadIdx.x; j < ATT_TILE; j += blockDim.x)
            real_s[j] = k0 + j < seq ? real[k0 + j] : 0;
        __syncthreads();
        float sc[ATT_TILE];
        float tile_max = -CUDART_INF_F;
#pragma unroll
        for (int j = 0; j < ATT_TILE; ++j) {
            float s = 0.f;
#pragma unroll
            for (int x = 0; x < DPT; ++x) s += qr[x] * ks[j][x * G + g];
            s = group_sum<G>(s) * scale;
            const int key = k0 + j;
            const bool seen = active && key < key_end && key <= i && real_s[j];
            sc[j] = seen ? s : -CUDART_INF_F;
            tile_max = fmaxf(tile_max, sc[j]);
        }
        if (tile_max > -CUDART_INF_F) {
            const float m_new = fmaxf(m, tile_max);
            const float correction = expf(m - m_new);
            l *= correction;
#pragma unroll
            for (int x = 0; x < DPT; ++x) acc[x] *= correction;
#pragma unroll
            for (int j = 0; j < ATT_TILE; ++j) {
                if (sc[j] == -CUDART_INF_F) continue;
                const float p = expf(sc[j] - m_new);
                l += p;
#pragma unroll
                for (int x = 0; x < DPT; ++x) acc[x] += p * vs[j][x * G + g];
            }
            m = m_new;
        }
    }
    const bool unseeing = active && l == 0.f;
    if (__syncthreads_or(unseeing)) {
        // The block has a row that saw nothing: it averages every value of the sequence.
        for (int k0 = 0; k0 < seq; k0 += ATT_TILE) {
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_TILE * HD; e += blockDim.x) {
                const int j = e / HD, d = e % HD, key = k0 + j;
                vs[j][d] = key < seq ? load(v, kv_at + (size_t)key * HD + d) : 0.f;
            }
            __syncthreads();
            if (unseeing)
                for (int j = 0; j < ATT_TILE && k0 + j < seq; ++j)
#pragma unroll
                    for (int x = 0; x < DPT; ++x) acc[x] += vs[j][x * G + g];
        }
    }
    if (!active) return;
    const float inv = unseeing ? 1.f / (float)seq : 1.f / l;
    const size_t out_at = ((size_t)(b * seq + i) * heads + h) * HD;
#pragma unroll
    for (int x = 0; x < DPT; ++x) store(out, out_at + x * G + g, acc[x] * inv);
    if (g == 0) lse[(size_t)(b * heads + h) * seq + i] = unseeing ? CUDART_INF_F : m + logf(l);
}

// delta[b, h, i] = Σ_d dout[b, i, h, d] · out[b, i, h, d], one warp per row (the backward's D).
template <typename T>
__device__ void attention_backward_delta(const T* out, const T* dout, int batch, int heads,
                                         int seq, int hd, float* delta) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const size_t rows = (size_t)batch * seq * heads;
    if (row >= rows) return;
    float s = 0.f;
    for (int d = threadIdx.x % 32; d < hd; d += 32)
        s += load(out, row * hd + d) * load(dout, row * hd + d);
    s = warp_sum(s);
    // row = (b * seq + i) * heads + h
    const size_t h = row % heads, bi = row / heads, i = bi % seq, b = bi / seq;
    if (threadIdx.x % 32 == 0) delta[(b * heads + h) * seq + i] = s;
}

// p for query row i against key j from the saved log-sum-exp; 1/seq on a row that saw nothing.
__device__ __forceinline__ float recomputed_prob(float s, float row_lse, bool seen, float inv_seq) {
    if (isinf(row_lse)) return inv_seq;
    return seen ? expf(s - row_lse) : 0.f;
}

template <typename T, int HD>
__device__ void attention_backward_dq(const T* q, const T* k, const T* v, const uint8_t* real_keys,
                                      const T* dout, const float* lse, const float* delta,
                                      int heads, int kv_heads, int seq, float scale, T* dq) {
    constexpr int G = HD / 32, DPT = 32;
    __shared__ float ks[ATT_TILE][HD];
    __shared__ float vs[ATT_TILE][HD];
    __shared__ uint8_t real_s[ATT_TILE];
    const int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int g = threadIdx.x % G, q0 = blockIdx.x * ATT_ROWS;
    const int i = q0 + threadIdx.x / G;
    const bool active = i < seq;
    const size_t row = (size_t)(b * heads + h) * seq + (active ? i : 0);
    const size_t dout_at = ((size_t)(b * seq + (active ? i : 0)) * heads + h) * HD;
    const size_t kv_at = (size_t)(b * kv_heads + kvh) * seq * HD;
    float qr[DPT], dor[DPT], acc[DPT];
#pragma unroll
    for (int x = 0; x < DPT; ++x) {
        qr[x] = active ? load(q, row * HD + x * G + g) : 0.f;
        dor[x] = active ? load(dout, dout_at + x * G + g) : 0.f;
        acc[x] = 0.f;
    }
    const float row_lse = active ? lse[row] : 0.f, row_delta = active ? delta[row] : 0.f;
    const float inv_seq = 1.f / (float)seq;
    const uint8_t* real = real_keys + (size_t)b * seq;
    // A row that saw nothing depends on every key.
    const int key_end = __syncthreads_or(active && isinf(row_lse)) ? seq : min(seq, q0 + ATT_ROWS);
    for (int k0 = 0; k0 < key_end; k0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * HD; e += blockDim.x) {
            const int j = e / HD, d = e % HD, key = k0 + j;
            ks[j][d] = key < seq ? load(k, kv_at + (size_t)key * HD + d) : 0.f;
            vs[j][d] = key < seq ? load(v, kv_at + (size_t)key * HD + d) : 0.f;
        }
        for (int j = threadIdx.x; j < ATT_TILE; j += blockDim.x)
            real_s[j] = k0 + j < seq ? real[k0 + j] : 0;
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < ATT_TILE; ++j) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int x = 0; x < DPT; ++x) {
                s += qr[x] * ks[j][x * G + g];
                dp += dor[x] * vs[j][x * G + g];
            }
            s = group_sum<G>(s) * scale;
            dp = group_sum<G>(dp);
            const int key = k0 + j;
            const bool valid = active && key < seq;
            const float p = valid ? recomputed_prob(s, row_lse, key <= i && real_s[j], inv_seq) : 0.f;
            const float ds = p * (dp - row_delta);
#pragma unroll
            for (int x = 0; x < DPT; ++x) acc[x] += ds * ks[j][x * G + g];
        }
    }
    if (!active) return;
#pragma unroll
    for (int x = 0; x < DPT; ++x) store(dq, row * HD + x * G + g, acc[x] * scale);
}

template <typename T, int HD>
__device__ void attention_backward_dkv(const T* q, const T* k, const T* v,
                                       const uint8_t* real_keys, const T* dout, const float* lse,
                                       const float* delta, int heads, int kv_heads, int seq,
                                       float scale, T* dk, T* dv) {
    constexpr int G = HD / 32, DPT = 32;
    __shared__ float qs[ATT_TILE][HD];
    __shared__ float dos[ATT_TILE][HD];
    __shared__ float lse_s[ATT_TILE];
    __shared__ float delta_s[ATT_TILE];
    const int b = blockIdx.z, kvh = blockIdx.y, group = heads / kv_heads;
    const int g = threadIdx.x % G, j0 = blockIdx.x * ATT_ROWS;
    const int j = j0 + threadIdx.x / G;
    const bool active = j < seq;
    const size_t kv_row = (size_t)(b * kv_heads + kvh) * seq + (active ? j : 0);
    float kr[DPT], vr[DPT], dk_acc[DPT], dv_acc[DPT];
#pragma unroll
    for (int x = 0; x < DPT; ++x) {
        kr[x] = active ? load(k, kv_row * HD + x * G + g) : 0.f;
        vr[x] = active ? load(v, kv_row * HD + x * G + g) : 0.f;
        dk_acc[x] = 0.f;
        dv_acc[x] = 0.f;
    }
    const bool key_real = active && real_keys[(size_t)b * seq + j];
    const float inv_seq = 1.f / (float)seq;
    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        const size_t q_head = (size_t)(b * heads + h) * seq;
        for (int i0 = 0; i0 < seq; i0 += ATT_TILE) {
            __syncthreads();
            if (threadIdx.x < ATT_TILE) {
                const int qi = i0 + threadIdx.x;
                lse_s[threadIdx.x] = qi < seq ? lse[q_head + qi] : 0.f;
                delta_s[threadIdx.x] = qi < seq ? delta[q_head + qi] : 0.f;
            }
            __syncthreads();
            // Query rows before the block's first key see none of its keys, unless a row saw
            // nothing at all (then it weighs every key).
            const bool before_keys = i0 + ATT_TILE - 1 < j0;
            const bool has_unseeing =
                __syncthreads_or(threadIdx.x < ATT_TILE && i0 + (int)threadIdx.x < seq &&
                                 isinf(lse_s[threadIdx.x]));
            if (before_keys && !has_unseeing) continue;
            for (int e = threadIdx.x; e < ATT_TILE * HD; e += blockDim.x) {
                const int r = e / HD, d = e % HD, qi = i0 + r;
                qs[r][d] = qi < seq ? load(q, (q_head + qi) * HD + d) : 0.f;
                dos[r][d] = qi < seq ? load(dout, ((size_t)(b * seq + qi) * heads + h) * HD + d) : 0.f;
            }
            __syncthreads();
#pragma unroll 4
            for (int r = 0; r < ATT_TILE; ++r) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int x = 0; x < DPT; ++x) {
                    s += kr[x] * qs[r][x * G + g];
                    dp += vr[x] * dos[r][x * G + g];
                }
                s = group_sum<G>(s) * scale;
                dp = group_sum<G>(dp);
                const int qi = i0 + r;
                const bool valid = active && qi < seq;
                const float p =
                    valid ? recomputed_prob(s, lse_s[r], j <= qi && key_real, inv_seq) : 0.f;
                const float ds = p * (dp - delta_s[r]);
#pragma unroll
                for (int x = 0; x < DPT; ++x) {
                    dv_acc[x] += p * dos[r][x * G + g];
                    dk_acc[x] += ds * qs[r][x * G + g];
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int x = 0; x < DPT; ++x) {
        store(dk, kv_row * HD + x * G + g, dk_acc[x] * scale);
        store(dv, kv_row * HD + x * G + g, dv_acc[x]);
    }
}

#define ATTENTION(NAME, T, HD)                                                                   \
    extern "C" __global__ void attention_forward_##NAME##_##HD(                                  \
        const T* q, const T* k, const T* v, const uint8_t* real_keys, int heads, int kv_heads,    \
        int seq, float scale, T* out, float* lse) {                                              \
        attention_forward<T, HD>(q, k, v, real_keys, heads, kv_heads, seq, scale, out, lse);     \
    }                                                                                            \
    extern "C" __global__ void attention_backward_dq_##NAME##_##HD(                              \
        const T* q, const T* k, const T* v, const uint8_t* real_keys, const T* dout,             \
        const float* lse, const float* delta, int heads, int kv_heads, int seq, float scale,     \
        T* dq) {                                                                                 \
        attention_backward_dq<T, HD>(q, k, v, real_keys, dout, lse, delta, heads, kv_heads, seq, \
                                     scale, dq);                                                 \
    }                                                                                            \
    extern "C" __global__ void attention_backward_dkv_##NAME##_##HD(                             \
        const T* q, const T* k, const T* v, const uint8_t* real_keys, const T* dout,             \
        const float* lse, const float* delta, int heads, int kv_heads, int seq, float scale,     \
        T* dk, T* dv) {                                                                          \
        attention_backward_dkv<T, HD>(q, k, v, real_keys, dout, lse, delta, heads, kv_heads,     \
                                      seq, scale, dk, dv);                                       \
    }
ATTENTION(f32, float, 64)
ATTENTION(f32, float, 128)
ATTENTION(bf16, bf16, 64)
ATTENTION(bf16, bf16, 128)

#define ATTENTION_DELTA(NAME, T)                                                                 \
    extern "C" __global__ void attention_backward_delta_##NAME(                                  \
        const T* out, const T* dout, int batch, int heads, int seq, int hd, float* delta) {      \
        attention_backward_delta<T>(out, dout, batch, heads, seq, hd, delta);                    \
    }
ATTENTION_DELTA(f32, float)
ATTENTION_DELTA(bf16, bf16)

// =============================================================================================
// RMSNorm (ops::rms_norm), optionally after the residual add (ops::add_rms_norm): one warp per
// row. sum = x + residual (rounded to T, as the composed add), normed = round(sum · inv_rms),
// y = round(normed · w), inv_rms = 1 / sqrt(mean(sum²) + eps) in f32.

template <typename T>
__device__ __forceinline__ float summed(const T* x, const T* residual, size_t i) {
    return residual ? round_to<T>(load(x, i) + load(residual, i)) : load(x, i);
}

template <typename T>
__device__ void rms_norm_forward(const T* x, const T* residual, const T* w, size_t rows, int dim,
                                 float eps, T* sum_out, T* y) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const size_t at = row * dim;
    float ss = 0.f;
    for (int d = lane; d < dim; d += 32) {
        const float s = summed(x, residual, at + d);
        ss += s * s;
        if (sum_out) store(sum_out, at + d, s);
    }
    const float inv = 1.f / sqrtf(warp_sum(ss) / (float)dim + eps);
    for (int d = lane; d < dim; d += 32) {
        const float normed = round_to<T>(summed(x, residual, at + d) * inv);
        store(y, at + d, normed * load(w, d));
    }
}

// dx = inv (dy ∘ w − n · mean(dy ∘ w ∘ n)) with n = x · inv, plus `dsum` (the gradient that
// reaches the residual sum directly) when given; writes each row's inv_rms for the dw pass.
template <typename T>
__device__ void rms_norm_backward_dx(const T* x, const T* w, const T* dy, const T* dsum,
                                     size_t rows, int dim, float eps, T* dx, float* inv_rms) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const size_t at = row * dim;
    float ss = 0.f, dot = 0.f;
    for (int d = lane; d < dim; d += 32) {
        const float v = load(x, at + d);
        ss += v * v;
        dot += load(dy, at + d) * load(w, d) * v;
    }
    const float inv = 1.f / sqrtf(warp_sum(ss) / (float)dim + eps);
    const float mean = warp_sum(dot) * inv / (float)dim;
    for (int d = lane; d < dim; d += 32) {
        const float n = load(x, at + d) * inv;
        float g = inv * (load(dy, at + d) * load(w, d) - n * mean);
        if (dsum) g += load(dsum, at + d);
        store(dx, at + d, g);
    }
    if (lane == 0) inv_rms[row] = inv;
}

// partial[c, d] = Σ over rows of chunk c of dy ∘ x ∘ inv_rms: thread d of block (d-tile, c);
// a fixed chunking, so dw sums in the same order every run.
template <typename T>
__device__ void rms_norm_backward_dw_partial(const T* x, const T* dy, const float* inv_rms,
                                             size_t rows, int dim, size_t rows_per_chunk,
                                             float* partial) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= dim) return;
    const size_t r0 = (size_t)blockIdx.y * rows_per_chunk;
    const size_t r1 = min(rows, r0 + rows_per_chunk);
    float s = 0.f;
    for (size_t r = r0; r < r1; ++r) s += load(dy, r * dim + d) * load(x, r * dim + d) * inv_rms[r];
    partial[(size_t)blockIdx.y * dim + d] = s;
}

// out[d] = Σ_c partial[c, d], rounded to T.
template <typename T>
__device__ void sum_columns(const float* partial, size_t chunks, int dim, T* out) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= dim) return;
    float s = 0.f;
    for (size_t c = 0; c < chunks; ++c) s += partial[c * dim + d];
    store(out, d, s);
}

#define RMS_NORM(NAME, T)                                                                        \
    extern "C" __global__ void rms_norm_forward_##NAME(const T* x, const T* residual,           \
                                                        const T* w, size_t rows, int dim,        \
                                                        float eps, T* sum_out, T* y) {           \
        rms_norm_forward<T>(x, residual, w, rows, dim, eps, sum_out, y);                         \
    }                                                                                            \
    extern "C" __global__ void rms_norm_backward_dx_##NAME(                                      \
        const T* x, const T* w, const T* dy, const T* dsum, size_t rows, int dim, float eps,     \
        T* dx, float* inv_rms) {                                                                 \
        rms_norm_backward_dx<T>(x, w, dy, dsum, rows, dim, eps, dx, inv_rms);                    \
    }                                                                                            \
    extern "C" __global__ void rms_norm_backward_dw_partial_##NAME(                              \
        const T* x, const T* dy, const float* inv_rms, size_t rows, int dim,                     \
        size_t rows_per_chunk, float* partial) {                                                 \
        rms_norm_backward_dw_partial<T>(x, dy, inv_rms, rows, dim, rows_per_chunk, partial);     \
    }                                                                                            \
    extern "C" __global__ void sum_columns_##NAME(const float* partial, size_t chunks, int dim, \
                                                   T* out) {                                     \
        sum_columns<T>(partial, chunks, dim, out);                                               \
    }
RMS_NORM(f32, float)
RMS_NORM(bf16, bf16)

// =============================================================================================
// RoPE (ops::apply_rotary), rotate-half: x (rows = … · seq, dim), tables (seq, dim) in T. One
// thread per (row, pair) reads both elements of its pair before writing them, so `out` may be
// `x` itself (in place). `transpose` applies the adjoint rotation (the backward pass).

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, size_t rows, int seq, int dim,
                     int transpose, T* out) {
    const int half = dim / 2;
    const size_t n = rows * half;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t row = e / half;
        const int j = e % half;
        const size_t at = row * dim, t = (row % seq) * dim;
        const float lo = load(x, at + j), hi = load(x, at + j + half);
        const float c_lo = load(cos, t + j), c_hi = load(cos, t + j + half);
        const float s_lo = load(sin, t + j), s_hi = load(sin, t + j + half);
        float out_lo, out_hi;
        if (transpose) {
            out_lo = lo * c_lo + hi * s_hi;
            out_hi = hi * c_hi - lo * s_lo;
        } else {
            out_lo = lo * c_lo - hi * s_lo;
            out_hi = hi * c_hi + lo * s_hi;
        }
        store(out, at + j, out_lo);
        store(out, at + j + half, out_hi);
    }
}

// =============================================================================================
// SwiGLU (ops::swiglu): y = round(round(silu(gate)) · up); the backward with s = sigmoid(gate):
// dgate = dy · up · s (1 + gate (1 − s)), dup = dy · gate · s.

template <typename T>
__device__ void swiglu_forward(const T* gate, const T* up, size_t n, T* y) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = load(gate, i);
        store(y, i, round_to<T>(g / (1.f + expf(-g))) * load(up, i));
    }
}

template <typename T>
__device__ void swiglu_backward(const T* gate, const T* up, const T* dy, size_t n, T* dgate,
                                T* dup) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = load(gate, i), u = load(up, i), d = load(dy, i);
        const float s = 1.f / (1.f + expf(-g));
        store(dgate, i, d * u * s * (1.f + g * (1.f - s)));
        store(dup, i, d * g * s);
    }
}

#define ELEMENTWISE(NAME, T)                                                                     \
    extern "C" __global__ void rope_##NAME(const T* x, const T* cos, const T* sin, size_t rows, \
                                           int seq, int dim, int transpose, T* out) {            \
        rope<T>(x, cos, sin, rows, seq, dim, transpose, out);                                    \
    }                                                                                            \
    extern "C" __global__ void swiglu_forward_##NAME(const T* gate, const T* up, size_t n,      \
                                                      T* y) {                                    \
        swiglu_forward<T>(gate, up, n, y);                                                       \
    }                                                                                            \
    extern "C" __global__ void swiglu_backward_##NAME(const T* gate, const T* up, const T* dy,  \
                                                       size_t n, T* dgate, T* dup) {             \
        swiglu_backward<T>(gate, up, dy, n, dgate, dup);                                         \
    }
ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, bf16)

// =============================================================================================
// Embedding (Model::embed): out[r] = table[ids[r]] cast to the compute dtype; the backward adds
// each row of dy into an f32 gradient of the table with atomics, every element in parallel
// (candle's index_add walks the ids one after another). An id outside the table reads zeros
// and adds nothing.

template <typename TT, typename TO>
__device__ void embedding_forward(const TT* table, const uint32_t* ids, size_t n_ids, int hidden,
                                  size_t vocab, TO* out) {
    const size_t n = n_ids * hidden;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t r = e / hidden, d = e % hidden, id = ids[r];
        store(out, e, id < vocab ? load(table, id * hidden + d) : 0.f);
    }
}

template <typename TO>
__device__ void embedding_backward(const TO* dy, const uint32_t* ids, size_t n_ids, int hidden,
                                   size_t vocab, float* dtable) {
    const size_t n = n_ids * hidden;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t r = e / hidden, d = e % hidden, id = ids[r];
        if (id < vocab) atomicAdd(dtable + id * hidden + d, load(dy, e));
    }
}

#define EMBEDDING(NAME, TT, TO)                                                                  \
    extern "C" __global__ void embedding_forward_##NAME(const TT* table, const uint32_t* ids,   \
                                                         size_t n_ids, int hidden, size_t vocab, \
                                                         TO* out) {                              \
        embedding_forward<TT, TO>(table, ids, n_ids, hidden, vocab, out);                        \
    }
EMBEDDING(f32_f32, float, float)
EMBEDDING(f32_bf16, float, bf16)
EMBEDDING(bf16_bf16, bf16, bf16)
EMBEDDING(bf16_f32, bf16, float)
extern "C" __global__ void embedding_backward_f32(const float* dy, const uint32_t* ids,
                                                  size_t n_ids, int hidden, size_t vocab,
                                                  float* dtable) {
    embedding_backward<float>(dy, ids, n_ids, hidden, vocab, dtable);
}
extern "C" __global__ void embedding_backward_bf16(const bf16* dy, const uint32_t* ids,
                                                   size_t n_ids, int hidden, size_t vocab,
                                                   float* dtable) {
    embedding_backward<bf16>(dy, ids, n_ids, hidden, vocab, dtable);
}

// =============================================================================================
// Cross-entropy over a chunk of logits rows, in place (the CUDA head loss, ops::head_loss):
// one block per row. loss[r] = logsumexp(row) − row[target], correct[r] = (argmax == target),
// the first maximum winning as in candle's argmax; with `write_grad` the row becomes
// softmax(row) − onehot(target), the gradient for an upstream of 1, rounded to T. A row whose
// target is negative (ignored) gets loss 0, not correct, and a zero gradient.

struct MaxAt {
    float value;
    int index;
};

__device__ __forceinline__ MaxAt better(MaxAt a, MaxAt b) {
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
    return a;
}

__device__ MaxAt block_argmax(MaxAt v) {
    __shared__ float values[32];
    __shared__ int indices[32];
    __shared__ MaxAt result;
    for (int offset = 16; offset > 0; offset >>= 1) {
        MaxAt other{__shfl_xor_sync(0xffffffff, v.value, offset),
                    __shfl_xor_sync(0xffffffff, v.index, offset)};
        v = better(v, other);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        values[warp] = v.value;
        indices[warp] = v.index;
    }
    __syncthreads();
    if (warp == 0) {
        MaxAt w = lane < (int)(blockDim.x / 32) ? MaxAt{values[lane], indices[lane]}
                                                 : MaxAt{-CUDART_INF_F, 0x7fffffff};
        for (int offset = 16; offset > 0; offset >>= 1) {
            MaxAt other{__shfl_xor_sync(0xffffffff, w.value, offset),
                        __shfl_xor_sync(0xffffffff, w.index, offset)};
            w = better(w, other);
        }
        if (lane == 0) result = w;
    }
    __syncthreads();
    return result;
}

__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float result;
    v = warp_sum(v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) result = w;
    }
    __syncthreads();
    return result;
}

template <typename T>
__device__ void cross_entropy_chunk(T* logits, const int64_t* targets, size_t vocab,
                                    int write_grad, float* loss, uint8_t* correct) {
    const size_t r = blockIdx.x;
    const int64_t target = targets[r];
    T* row = logits + r * vocab;
    if (target < 0 || (size_t)target >= vocab) {
        if (threadIdx.x == 0) {
            loss[r] = 0.f;
            correct[r] = 0;
        }
        if (write_grad)
            for (size_t j = threadIdx.x; j < vocab; j += blockDim.x) store(row, j, 0.f);
        return;
    }
    MaxAt best{-CUDART_INF_F, 0x7fffffff};
    for (size_t j = threadIdx.x; j < vocab; j += blockDim.x)
        best = better(best, MaxAt{load(row, j), (int)j});
    best = block_argmax(best);
    float s = 0.f;
    for (size_t j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(load(row, j) - best.value);
    const float lse = best.value + logf(block_sum(s));
    if (threadIdx.x == 0) {
        loss[r] = lse - load(row, target);
        correct[r] = best.index == target;
    }
    __syncthreads();  // every thread has read the target's logit before it is overwritten
    if (write_grad)
        for (size_t j = threadIdx.x; j < vocab; j += blockDim.x)
            store(row, j, expf(load(row, j) - lse) - ((int64_t)j == target ? 1.f : 0.f));
}

#define CROSS_ENTROPY_CHUNK(NAME, T)                                                             \
    extern "C" __global__ void cross_entropy_chunk_##NAME(T* logits, const int64_t* targets,    \
                                                           size_t vocab, int write_grad,         \
                                                           float* loss, uint8_t* correct) {      \
        cross_entropy_chunk<T>(logits, targets, vocab, write_grad, loss, correct);               \
    }
CROSS_ENTROPY_CHUNK(f32, float)
CROSS_ENTROPY_CHUNK(bf16, bf16)

// =============================================================================================
// MoE: the picks grouped by expert without the host (SparseMoeBlock's grouped path), and the
// grouped matmuls over the rows sorted by expert.
//
// moe_expert_offsets: from the (picks,) expert choices, offsets[e] = picks before expert e
// (offsets[E] = picks), the picks in expert order (token row, slot; ascending slot within an
// expert, as moe_group_by_expert in train.cu), and the tile table of the grouped matmul:
// tiles[t] = (expert, first row) for every GEMM_M-row tile of every expert, `tiles_used` of
// at most picks / GEMM_M + E. One block; nothing goes back to the host.

constexpr int GEMM_M = 64, GEMM_N = 64, GEMM_K = 16;

extern "C" __global__ void moe_expert_offsets(const uint32_t* chosen, uint32_t picks, uint32_t k,
                                              uint32_t num_experts, uint32_t* offsets,
                                              uint32_t* rows_out, uint32_t* slots_out,
                                              uint32_t* tiles, uint32_t* tiles_used) {
    extern __shared__ uint32_t counts[];  // num_experts + 1
    for (uint32_t e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < picks; i += blockDim.x)
        if (chosen[i] < num_experts) atomicAdd(&counts[chosen[i]], 1u);
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t at = 0, tile = 0;
        for (uint32_t e = 0; e < num_experts; ++e) {
            const uint32_t c = counts[e];
            offsets[e] = at;
            for (uint32_t r = 0; r < c; r += GEMM_M) {
                tiles[2 * tile] = e;
                tiles[2 * tile + 1] = at + r;
                ++tile;
            }
            counts[e] = at;  // now: where expert e's picks start
            at += c;
        }
        offsets[num_experts] = at;
        *tiles_used = tile;
    }
    __syncthreads();
    // Stable placement: expert e's thread walks the picks in order.
    for (uint32_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
        uint32_t at = counts[e];
        for (uint32_t i = 0; i < picks; ++i) {
            if (chosen[i] == e) {
                rows_out[at] = i / k;
                slots_out[at] = i;
                ++at;
            }
        }
    }
}

// y[r, n] = Σ_k x[r, k] · W_e[n · w_n + k · w_k] for every row r of expert e's block of the
// sorted rows, W_e = weights + e · w_expert: (w_n, w_k) = (K, 1) multiplies by W_eᵀ for W_e
// (N, K) (the forward), (1, N) by W_e for W_e (K, N) viewed as the (N_out = K) backward's
// dx = dy · W_e. One 64 × 64 output tile per block, 256 threads of 4 × 4 outputs, K in steps of
// 16 through shared memory; blocks past tiles_used return at once.
template <typename T>
__device__ void grouped_matmul(const T* x, const T* weights, const uint32_t* offsets,
                               const uint32_t* tiles, const uint32_t* tiles_used, int K, int N,
                               size_t w_expert, size_t w_n, size_t w_k, T* y) {
    const uint32_t tile = blockIdx.y;
    if (tile >= *tiles_used) return;
    const uint32_t e = tiles[2 * tile], r0 = tiles[2 * tile + 1], r_end = offsets[e + 1];
    const int n0 = blockIdx.x * GEMM_N;
    const T* w = weights + e * w_expert;
    __shared__ float xs[GEMM_K][GEMM_M + 1];
    __shared__ float ws[GEMM_K][GEMM_N + 1];
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += GEMM_K) {
        for (int e2 = threadIdx.x; e2 < GEMM_M * GEMM_K; e2 += blockDim.x) {
            const int m = e2 / GEMM_K, kk = e2 % GEMM_K;
            const uint32_t r = r0 + m;
            xs[kk][m] = (r < r_end && k0 + kk < K) ? load(x, (size_t)r * K + k0 + kk) : 0.f;
            const int n = n0 + m;  // GEMM_N == GEMM_M
            ws[kk][m] = (n < N && k0 + kk < K) ? load(w, n * w_n + (k0 + kk) * w_k) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_K; ++kk) {
            float a[4], bv[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                a[u] = xs[kk][tr + 16 * u];
                bv[u] = ws[kk][tc + 16 * u];
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[u][c] += a[u] * bv[c];
        }
        __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const uint32_t r = r0 + tr + 16 * u;
        if (r >= r_end) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int n = n0 + tc + 16 * c;
            if (n < N) store(y, (size_t)r * N + n, acc[u][c]);
        }
    }
}

// dw[e][n, k] = Σ over expert e's rows r of dy[r, n] · x[r, k]: block (k-tile, n-tile, e), the
// rows in steps of 16; an expert without rows gets zeros.
template <typename T>
__device__ void grouped_weight_grad(const T* dy, const T* x, const uint32_t* offsets, int N,
                                    int K, T* dw) {
    const uint32_t e = blockIdx.z, r_begin = offsets[e], r_end = offsets[e + 1];
    const int k0 = blockIdx.x * GEMM_N, n0 = blockIdx.y * GEMM_M;
    __shared__ float dys[GEMM_K][GEMM_M + 1];
    __shared__ float xs[GEMM_K][GEMM_N + 1];
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    float acc[4][4] = {};
    for (uint32_t rr = r_begin; rr < r_end; rr += GEMM_K) {
        for (int e2 = threadIdx.x; e2 < GEMM_M * GEMM_K; e2 += blockDim.x) {
            const int m = e2 % GEMM_M, kk = e2 / GEMM_M;
            const uint32_t r = rr + kk;
            const bool in = r < r_end;
            dys[kk][m] = (in && n0 + m < N) ? load(dy, (size_t)r * N + n0 + m) : 0.f;
            xs[kk][m] = (in && k0 + m < K) ? load(x, (size_t)r * K + k0 + m) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_K; ++kk) {
            float a[4], bv[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                a[u] = dys[kk][tr + 16 * u];
                bv[u] = xs[kk][tc + 16 * u];
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[u][c] += a[u] * bv[c];
        }
        __syncthreads();
    }
    T* out = dw + (size_t)e * N * K;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int n = n0 + tr + 16 * u;
        if (n >= N) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int kk = k0 + tc + 16 * c;
            if (kk < K) store(out, (size_t)n * K + kk, acc[u][c]);
        }
    }
}

#define GROUPED(NAME, T)                                                                         \
    extern "C" __global__ void grouped_matmul_##NAME(                                            \
        const T* x, const T* weights, const uint32_t* offsets, const uint32_t* tiles,            \
        const uint32_t* tiles_used, int K, int N, size_t w_expert, size_t w_n, size_t w_k,       \
        T* y) {                                                                                  \
        grouped_matmul<T>(x, weights, offsets, tiles, tiles_used, K, N, w_expert, w_n, w_k, y);  \
    }                                                                                            \
    extern "C" __global__ void grouped_weight_grad_##NAME(const T* dy, const T* x,              \
                                                           const uint32_t* offsets, int N,       \
                                                           int K, T* dw) {                       \
        grouped_weight_grad<T>(dy, x, offsets, N, K, dw);                                        \
    }
GROUPED(f32, float)
GROUPED(bf16, bf16)

// =============================================================================================
// Every byte of a fresh output set to `value` (0xff: NaN in f32 and bf16), so that a check can
// see any element a kernel failed to write.
extern "C" __global__ void fill_bytes(uint8_t* p, size_t n, int value) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = (uint8_t)value;
}

// whet's training kernels: the CUDA forms of the engine's fused CPU ops, with the same
// semantics (engine/src/cuda/mod.rs launches them; each op's Rust doc says what it computes).
// Where the CPU result is bit-exact f32 arithmetic (AdamW, NF4 dequantization), the kernels
// use the _rn intrinsics so that nvcc cannot contract a multiply and an add into one FMA.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

// ---------------------------------------------------------------------------------------------
// Element conversions: T is the stored type, A the accumulator (f32, or f64 for f64 tensors).

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Block-wide reductions for blocks of a multiple of 32 threads (at most 1024).
template <typename A> __device__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    return v;
}
template <typename A> __device__ A warp_max(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_down_sync(0xffffffff, v, offset));
    return v;
}
// The block's sum (or max), on every thread.
template <typename A, bool IS_MAX> __device__ A block_reduce(A v) {
    __shared__ A partial[32];
    __shared__ A result;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / 32;
        A w = lane < warps ? partial[lane] : (IS_MAX ? A(-CUDART_INF) : A(0));
        w = IS_MAX ? warp_max(w) : warp_sum(w);
        if (lane == 0) result = w;
    }
    __syncthreads();
    return result;
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over rows of logits (CrossEntropySumOp's CUDA form). One block per row:
// lse[r] = logsumexp(logits[r]), loss[r] = lse[r] - logits[r, targets[r]]; both 0 for a row
// whose target is negative (ignored).

template <typename T>
__device__ void cross_entropy_forward(const T* logits, const int64_t* targets, size_t vocab,
                                      typename Acc<T>::type* lse, typename Acc<T>::type* loss) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    const int64_t target = targets[r];
    if (target < 0) {
        if (threadIdx.x == 0) {
            lse[r] = A(0);
            loss[r] = A(0);
        }
        return;
    }
    const T* row = logits + r * vocab;
    A m = A(-CUDART_INF);
    for (size_t j = threadIdx.x; j < vocab; j += blockDim.x) m = max(m, to_acc(row[j]));
    m = block_reduce<A, true>(m);
    A s = A(0);
    for (size_t j = threadIdx.x; j < vocab; j += blockDim.x) s += exp_acc(to_acc(row[j]) - m);
    s = block_reduce<A, false>(s);
    if (threadIdx.x == 0) {
        const A l = m + log_acc(s);
        lse[r] = l;
        loss[r] = l - to_acc(row[target]);
    }
}

// grad[r, j] = (softmax(logits[r])[j] - (j == targets[r])) * upstream[r]; 0 on ignored rows.
template <typename T>
__device__ void cross_entropy_backward(const T* logits, const int64_t* targets,
                                       const typename Acc<T>::type* lse,
                                       const typename Acc<T>::type* upstream, size_t rows,
                                       size_t vocab, T* grad) {
    typedef typename Acc<T>::type A;
    const size_t n = rows * vocab;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / vocab, j = i - r * vocab;
        const int64_t target = targets[r];
        A g = A(0);
        if (target >= 0) {
            g = exp_acc(to_acc(logits[i]) - lse[r]);
            if ((int64_t)j == target) g -= A(1);
            g *= upstream[r];
        }
        grad[i] = from_acc<T>(g);
    }
}

#define CROSS_ENTROPY(NAME, T)                                                                   \
    extern "C" __global__ void cross_entropy_forward_##NAME(                                     \
        const T* logits, const int64_t* targets, size_t vocab, Acc<T>::type* lse,                \
        Acc<T>::type* loss) {                                                                    \
        cross_entropy_forward<T>(logits, targets, vocab, lse, loss);                             \
    }                                                                                            \
    extern "C" __global__ void cross_entropy_backward_##NAME(                                    \
        const T* logits, const int64_t* targets, const Acc<T>::type* lse,                        \
        const Acc<T>::type* upstream, size_t rows, size_t vocab, T* grad) {                      \
        cross_entropy_backward<T>(logits, targets, lse, upstream, rows, vocab, grad);            \
    }
CROSS_ENTROPY(f32, float)
CROSS_ENTROPY(f64, double)
CROSS_ENTROPY(bf16, __nv_bfloat16)
CROSS_ENTROPY(f16, __half)

// ---------------------------------------------------------------------------------------------
// AdamW on one flat f32 piece (optim.rs's fused_cpu_update, operation for operation):
// out[0..n] = new param, out[n..2n] = new exp_avg, out[2n..3n] = new exp_avg_sq. `grad` may be
// null (a parameter without a gradient updates as if it were zero); `has_decay` says whether
// the param is first multiplied by `decay`.

// One element's update; the single-tensor and the multi-tensor kernels both run it.
__device__ __forceinline__ void adamw_element(float g, float& p, float& m, float& v, int has_decay,
                                              float decay, float one_minus_beta1, float beta2,
                                              float one_minus_beta2, float bias_correction2_sqrt,
                                              float eps, float neg_step_size) {
    if (has_decay) p = __fadd_rn(__fmul_rn(p, decay), 0.0f);
    const float m0 = m, v0 = v;
    m = __fadd_rn(m0, __fadd_rn(__fmul_rn(__fsub_rn(g, m0), one_minus_beta1), 0.0f));
    v = __fadd_rn(__fadd_rn(__fmul_rn(v0, beta2), 0.0f),
                  __fadd_rn(__fmul_rn(__fmul_rn(g, g), one_minus_beta2), 0.0f));
    const float denom =
        __fadd_rn(__fmul_rn(__fdiv_rn(__fsqrt_rn(v), bias_correction2_sqrt), 1.0f), eps);
    const float update = __fadd_rn(__fmul_rn(__fdiv_rn(m, denom), neg_step_size), 0.0f);
    p = __fadd_rn(p, update);
}

extern "C" __global__ void adamw_f32(const float* param, const float* grad, const float* exp_avg,
                                     const float* exp_avg_sq, size_t n, int has_decay,
                                     float decay, float one_minus_beta1, float beta2,
                                     float one_minus_beta2, float bias_correction2_sqrt,
                                     float eps, float neg_step_size, float* out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
        adamw_element(grad ? grad[i] : 0.0f, p, m, v, has_decay, decay, one_minus_beta1, beta2,
                      one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size);
        out[i] = p;
        out[n + i] = m;
        out[2 * n + i] = v;
    }
}

// Many tensors in one launch (cuda::adamw_multi): block b updates chunk b, `chunks[b]` =
// (tensor, first element), CHUNK elements or up to the tensor's end, in place. `tensors[t]` holds
// tensor t's device pointers and size; a null grad updates as a zero gradient.
struct AdamWTensor {
    float* param;
    const float* grad;
    float* exp_avg;
    float* exp_avg_sq;
    uint64_t n;
    uint64_t has_decay;
};

extern "C" __global__ void adamw_multi_f32(const AdamWTensor* tensors, const uint64_t* chunks,
                                           uint64_t chunk, float decay, float one_minus_beta1,
                                           float beta2, float one_minus_beta2,
                                           float bias_correction2_sqrt, float eps,
                                           float neg_step_size) {
    const AdamWTensor t = tensors[chunks[2 * blockIdx.x]];
    const uint64_t first = chunks[2 * blockIdx.x + 1];
    const uint64_t end = min(t.n, first + chunk);
    for (uint64_t i = first + threadIdx.x; i < end; i += blockDim.x) {
        float p = t.param[i], m = t.exp_avg[i], v = t.exp_avg_sq[i];
        adamw_element(t.grad ? t.grad[i] : 0.0f, p, m, v, (int)t.has_decay, decay,
                      one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                      neg_step_size);
        t.param[i] = p;
        t.exp_avg[i] = m;
        t.exp_avg_sq[i] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Sum of squares in f64 (the gradient norm): each block writes the sum of its grid-stride
// elements to partial[blockIdx.x]; sum_f64 then adds the partials in one block. A fixed grid
// makes the result the same from run to run.

template <typename T>
__device__ void sum_of_squares_partial(const T* x, size_t n, double* partial) {
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const double v = (double)to_acc(x[i]);
        s += v * v;
    }
    s = block_reduce<double, false>(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
extern "C" __global__ void sum_of_squares_partial_f32(const float* x, size_t n, double* partial) {
    sum_of_squares_partial<float>(x, n, partial);
}
extern "C" __global__ void sum_of_squares_partial_bf16(const __nv_bfloat16* x, size_t n,
                                                       double* partial) {
    sum_of_squares_partial<__nv_bfloat16>(x, n, partial);
}
extern "C" __global__ void sum_f64(const double* x, size_t n, double* out) {
    double s = 0.0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_reduce<double, false>(s);
    if (threadIdx.x == 0) out[0] = s;
}

// The squares of many f32 tensors in one launch (cuda::sum_of_squares_multi): block b sums
// chunk b (`chunks[b]` = (tensor, first element), as adamw_multi_f32) into partial[b]; sum_f64
// then adds the partials, in chunk order, so the result repeats exactly.
extern "C" __global__ void sum_of_squares_multi_f32(const uint64_t* pointers, const uint64_t* sizes,
                                                    const uint64_t* chunks, uint64_t chunk,
                                                    double* partial) {
    const uint64_t t = chunks[2 * blockIdx.x], first = chunks[2 * blockIdx.x + 1];
    const float* x = (const float*)pointers[t];
    const uint64_t end = min(sizes[t], first + chunk);
    double s = 0.0;
    for (uint64_t i = first + threadIdx.x; i < end; i += blockDim.x) {
        const double v = (double)x[i];
        s += v * v;
    }
    s = block_reduce<double, false>(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// ---------------------------------------------------------------------------------------------
// 4-bit dequantization (quant.rs's QuantizedTensor::dequantize): element i is the code of its
// nibble (the high one first) times its 64-block's absmax, in f32, then rounded to T. The
// absmax is `absmax[b]`, or with double quantization `dynamic_map[absmax_codes[b]] *
// scales[b / 256] + offset` (absmax null).

template <typename T>
__device__ void dequantize_4bit(const uint8_t* packed, const float* code, const float* absmax,
                                const uint8_t* absmax_codes, const float* dynamic_map,
                                const float* scales, float offset, size_t n, T* out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint8_t byte = packed[i / 2];
        const uint8_t nibble = (i & 1) ? (byte & 0x0f) : (byte >> 4);
        const size_t block = i / 64;
        const float scale =
            absmax ? absmax[block]
                   : __fadd_rn(__fmul_rn(dynamic_map[absmax_codes[block]], scales[block / 256]),
                               offset);
        out[i] = from_acc<T>(__fmul_rn(code[nibble], scale));
    }
}

#define DEQUANTIZE(NAME, T)                                                                      \
    extern "C" __global__ void dequantize_4bit_##NAME(                                           \
        const uint8_t* packed, const float* code, const float* absmax,                           \
        const uint8_t* absmax_codes, const float* dynamic_map, const float* scales,              \
        float offset, size_t n, T* out) {                                                        \
        dequantize_4bit<T>(packed, code, absmax, absmax_codes, dynamic_map, scales, offset, n,   \
                           out);                                                                 \
    }
DEQUANTIZE(f32, float)
DEQUANTIZE(bf16, __nv_bfloat16)
DEQUANTIZE(f16, __half)

// ---------------------------------------------------------------------------------------------
// MoE routing: the (rows, k) expert choices grouped by expert, stably (ascending row within an
// expert, as the CPU's loop), on the device. One block; thread e looks after experts e,
// e + blockDim.x, ...: counts[e] = how many picks chose e; then, from offsets[e] = the counts
// before e, rows_out / slots_out list expert e's picks: the token row and its slot
// (row * k + pick index). Only the counts go back to the host (to size each expert's matmul).

extern "C" __global__ void moe_group_by_expert(const uint32_t* chosen, size_t picks,
                                               uint32_t k, uint32_t num_experts,
                                               uint32_t* counts, uint32_t* rows_out,
                                               uint32_t* slots_out) {
    extern __shared__ uint32_t offsets[];  // num_experts + 1
    for (uint32_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
        uint32_t c = 0;
        for (size_t i = 0; i < picks; ++i) c += chosen[i] == e;
        counts[e] = c;
        offsets[e + 1] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        offsets[0] = 0;
        for (uint32_t e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
        uint32_t at = offsets[e];
        for (size_t i = 0; i < picks; ++i) {
            if (chosen[i] == e) {
                rows_out[at] = (uint32_t)(i / k);
                slots_out[at] = (uint32_t)i;
                ++at;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA dropout masks (lora.rs's dropout_mask): element i is the (i + 1)-th splitmix64 output of
// `seed` — 0 when its top 53 bits fall below `threshold`, else `keep` — so the GPU draws the
// very mask the CPU streams, element by element.

__device__ __forceinline__ uint64_t splitmix64_at(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout_mask(uint64_t seed, size_t n, uint64_t threshold, float keep, T* out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const bool drop = (splitmix64_at(seed, i) >> 11) < threshold;
        out[i] = from_acc<T>(drop ? 0.0f : keep);
    }
}

#define DROPOUT(NAME, T)                                                                         \
    extern "C" __global__ void dropout_mask_##NAME(uint64_t seed, size_t n, uint64_t threshold,  \
                                                   float keep, T* out) {                         \
        dropout_mask<T>(seed, n, threshold, keep, out);                                          \
    }
DROPOUT(f32, float)
DROPOUT(f64, double)
DROPOUT(bf16, __nv_bfloat16)
DROPOUT(f16, __half)

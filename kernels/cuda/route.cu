// Router scoring and expert selection for the softmax rule: per token row, probabilities
// p = softmax(logits) over num_experts (<= ROUTE_MAX_EXPERTS), then the top k (<= ROUTE_MAX_K)
// by p (plus an optional selection bias), in descending order, ties to the lower expert index,
// with optional renormalisation over the chosen and a final scale.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = rows (one block per row). Thread t holds experts t,
// t + 256, t + 512, t + 768.
// Order: the selection compares choice scores by IEEE total order (Rust's `f32::total_cmp`, so
// -0 < +0 and NaNs are ordered as the CPU orders them), then by index. The maximum is exact in
// any order; the sum of exponentials uses a fixed tree (per thread, then xor shuffles, then the
// 8 warps in order), so results are deterministic and p is within a few ulp of the CPU twin's
// (whose sum is sequential); the chosen experts equal the twin's unless two scores are that close.
// The weights of the chosen are summed by one thread in selection order, as the twin does.

#define ROUTE_MAX_EXPERTS 1024
#define ROUTE_MAX_K 32
#define ROUTE_PER_THREAD 4 // ROUTE_MAX_EXPERTS / 256
#define ROUTE_WARPS 8

__device__ __forceinline__ float route_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ float route_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// The key `f32::total_cmp` orders by: the bits as a signed integer, with the magnitude bits of
// negative numbers flipped.
__device__ __forceinline__ int total_key(float f) {
    int i = __float_as_int(f);
    return i ^ (int)((unsigned)(i >> 31) >> 1);
}

// Whether candidate (ka, ia) ranks above (kb, ib): higher key, then lower index.
__device__ __forceinline__ bool ranks_above(int ka, unsigned ia, int kb, unsigned ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// Twin: `moe_runtime::backend::cpu::route::route` with `Scoring::Softmax` (no expert groups).
// logits is [rows, num_experts]; bias is [num_experts] or null; indices and weights are
// [rows, k]. The host checks 1 <= k <= min(num_experts, ROUTE_MAX_K) and
// num_experts <= ROUTE_MAX_EXPERTS. renormalize != 0 divides the chosen weights by their sum;
// a scale other than 1 then multiplies them.
extern "C" __global__ void __launch_bounds__(256)
route_softmax_topk_f32(const float* __restrict__ logits, const float* __restrict__ bias,
                       unsigned num_experts, unsigned k, unsigned renormalize, float scale,
                       unsigned* __restrict__ indices, float* __restrict__ weights) {
    __shared__ float red[ROUTE_WARPS];
    __shared__ int best_key[ROUTE_WARPS];
    __shared__ unsigned best_idx[ROUTE_WARPS];
    __shared__ float chosen_p[ROUTE_MAX_K];
    __shared__ unsigned chosen[ROUTE_MAX_K];
    unsigned t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const float* row = logits + (size_t)blockIdx.x * num_experts;
    float p[ROUTE_PER_THREAD];
    // Maximum.
    float mx = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < ROUTE_PER_THREAD; i++) {
        unsigned e = t + 256 * i;
        p[i] = e < num_experts ? __ldg(row + e) : 0.0f;
        if (e < num_experts) mx = fmaxf(mx, p[i]);
    }
    mx = route_warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
#pragma unroll
    for (int w = 1; w < ROUTE_WARPS; w++) mx = fmaxf(mx, red[w]);
    __syncthreads();
    // exp(l - max) and their sum.
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < ROUTE_PER_THREAD; i++) {
        if (t + 256 * i < num_experts) {
            p[i] = expf(__fsub_rn(p[i], mx));
            sum = __fadd_rn(sum, p[i]);
        }
    }
    sum = route_warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    sum = red[0];
#pragma unroll
    for (int w = 1; w < ROUTE_WARPS; w++) sum = __fadd_rn(sum, red[w]);
    // Probabilities; `taken` marks this thread's experts already chosen.
    unsigned taken = 0;
#pragma unroll
    for (int i = 0; i < ROUTE_PER_THREAD; i++) p[i] = __fdiv_rn(p[i], sum);
    for (unsigned s = 0; s < k; s++) {
        int key = (int)0x80000000;
        unsigned idx = 0xffffffffu;
#pragma unroll
        for (int i = 0; i < ROUTE_PER_THREAD; i++) {
            unsigned e = t + 256 * i;
            if (e < num_experts && !(taken >> i & 1)) {
                float c = bias ? __fadd_rn(p[i], __ldg(bias + e)) : p[i];
                int ck = total_key(c);
                if (ranks_above(ck, e, key, idx)) {
                    key = ck;
                    idx = e;
                }
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            int ok = __shfl_xor_sync(0xffffffffu, key, off);
            unsigned oi = __shfl_xor_sync(0xffffffffu, idx, off);
            if (ranks_above(ok, oi, key, idx)) {
                key = ok;
                idx = oi;
            }
        }
        if (lane == 0) {
            best_key[warp] = key;
            best_idx[warp] = idx;
        }
        __syncthreads();
        key = best_key[0];
        idx = best_idx[0];
#pragma unroll
        for (int w = 1; w < ROUTE_WARPS; w++) {
            if (ranks_above(best_key[w], best_idx[w], key, idx)) {
                key = best_key[w];
                idx = best_idx[w];
            }
        }
        if (idx < num_experts && idx % 256 == t) {
            unsigned i = idx / 256;
            taken |= 1u << i;
            chosen[s] = idx;
#pragma unroll
            for (unsigned q = 0; q < ROUTE_PER_THREAD; q++)
                if (q == i) chosen_p[s] = p[q];
        }
        __syncthreads();
    }
    if (t == 0) {
        float denom = 1.0f;
        if (renormalize) {
            denom = 0.0f;
            for (unsigned s = 0; s < k; s++) denom = __fadd_rn(denom, chosen_p[s]);
        }
        for (unsigned s = 0; s < k; s++) {
            float w = __fdiv_rn(chosen_p[s], denom);
            indices[(size_t)blockIdx.x * k + s] = chosen[s];
            weights[(size_t)blockIdx.x * k + s] = scale == 1.0f ? w : __fmul_rn(w, scale);
        }
    }
}

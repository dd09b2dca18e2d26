// Decode attention: one query row against its sequence's KV cache, per (row, KV head), for
// grouped-query attention (the nh / nkv query heads of a KV head share its keys and values),
// with scores scaled by head_dim^-0.5, a softmax in f32 with the maximum subtracted, an
// optional sliding window, and the KV cache in f32, bf16 or f16; split over positions for long
// contexts.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads (8 warps), grid = (rows, nkv, splits); static shared memory
// 8.3 KiB. Split-K for long contexts: with splits > 1, block z takes the z-th of `splits` equal
// runs of the attended positions and writes its partial softmax state (running maximum, sum of
// exponentials, weighted value sum) to `partial` ([rows, nh, splits, head_dim + 2] floats);
// `attention_merge_f32` (grid = (rows, nh)) then merges the splits in ascending order into out.
// With splits == 1 and `partial` null, the block writes out directly.
// Row r sits at position pos[r] of the sequence whose cache rows start at k_cache[r] /
// v_cache[r] (device addresses; several rows of one sequence, as in a prefill chunk, may name
// the same cache); its own key and value are already stored at row pos[r]. A cache is
// [tokens, nkv * head_dim] row-major, position p at row p. Row r attends to positions
// first..=pos[r], first = pos[r] + 1 - window when window > 0 and that is positive, else 0.
// q and out are [rows, nh * head_dim], heads of a KV head adjacent (kvh * group .. + group).
// `scale` is head_dim^-0.5 as the twin computes it on the host ((hd as f32).powf(-0.5)), so
// both scale by the same f32. Requirements the host checks: head_dim <= ATT_MAX_HEAD_DIM, nh a
// multiple of nkv, 1 <= splits <= 65535 with `partial` non-null when splits > 1, and the caches
// 4-byte (f32) or 2-byte (bf16, f16) aligned.
// Order: warp w of a split takes its positions lo + w, lo + w + 8, ...; per warp an online
// softmax (the running maximum subtracted before every exp), the dot products summed per lane
// in ascending order then by a fixed xor-shuffle tree; the 8 warps are then merged in
// ascending order. Deterministic; within the stated tolerance of the CPU twin, whose order differs (it scores
// every position first, then subtracts the global maximum). The number of splits changes the
// order, so the host derives it from the context length alone (never from load or timing).
// Sinks (gpt-oss): `sinks` null, or one logit per query head that joins the head's softmax as a
// position without a value: after the warps (or, with splits, the splits) are merged, the
// maximum takes the sink in and the denominator adds exp(sink - maximum).

#define ATT_MAX_HEAD_DIM 256
#define ATT_PER_LANE 8 // ATT_MAX_HEAD_DIM / 32
#define ATT_WARPS 8

__device__ __forceinline__ float att_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

enum KvType { KV_F32, KV_BF16, KV_F16 };

// Element `i` of a cache, widened exactly (bf16: bits << 16; f16: cvt.f32.f16).
template <KvType T>
__device__ __forceinline__ float kv_load(const void* base, size_t i) {
    if constexpr (T == KV_F32) return __ldg((const float*)base + i);
    if constexpr (T == KV_BF16)
        return __uint_as_float((unsigned)__ldg((const unsigned short*)base + i) << 16);
    if constexpr (T == KV_F16) return f16_to_f32(__ldg((const unsigned short*)base + i));
    return 0.0f;
}

template <KvType T>
__device__ __forceinline__ void attend_body(const float* __restrict__ q,
                                            const unsigned long long* __restrict__ k_cache,
                                            const unsigned long long* __restrict__ v_cache,
                                            const unsigned* __restrict__ pos, unsigned window,
                                            unsigned nh, unsigned nkv, unsigned hd,
                                            float scale, unsigned splits,
                                            float* __restrict__ partial,
                                            float* __restrict__ out,
                                            const float* __restrict__ sinks) {
    __shared__ float s_max[ATT_WARPS], s_sum[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][ATT_MAX_HEAD_DIM];
    unsigned r = blockIdx.x, kvh = blockIdx.y, t = threadIdx.x, lane = t & 31, warp = t >> 5;
    unsigned group = nh / nkv, p = __ldg(pos + r);
    unsigned first = window > 0 && p + 1 > window ? p + 1 - window : 0;
    // This block's run of positions, lo..hi (empty for the last splits of a short context).
    unsigned n = p + 1 - first, chunk = (n + splits - 1) / splits, z = blockIdx.z;
    unsigned lo = first + (z * chunk < n ? z * chunk : n);
    unsigned hi = lo + chunk < p + 1 ? lo + chunk : p + 1;
    size_t kvr = (size_t)nkv * hd;
    const void* kb = (const void*)__ldg(k_cache + r);
    const void* vb = (const void*)__ldg(v_cache + r);
    size_t head_off = (size_t)kvh * hd;
#pragma unroll 1
    for (unsigned g = 0; g < group; g++) {
        unsigned h = kvh * group + g;
        const float* qh = q + ((size_t)r * nh + h) * hd;
        float qv[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; i++) {
            unsigned e = lane + 32 * i;
            qv[i] = e < hd ? __ldg(qh + e) : 0.0f;
            acc[i] = 0.0f;
        }
        float m = -__int_as_float(0x7f800000), l = 0.0f;
#pragma unroll 1
        for (unsigned tok = lo + warp; tok < hi; tok += ATT_WARPS) {
            size_t at = (size_t)tok * kvr + head_off;
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_PER_LANE; i++) {
                unsigned e = lane + 32 * i;
                if (e < hd) dot = fmaf(qv[i], kv_load<T>(kb, at + e), dot);
            }
            float s = __fmul_rn(att_warp_sum(dot), scale);
            float m_new = fmaxf(m, s);
            float c = expf(__fsub_rn(m, m_new)), pe = expf(__fsub_rn(s, m_new));
            l = fmaf(l, c, pe);
#pragma unroll
            for (int i = 0; i < ATT_PER_LANE; i++) {
                unsigned e = lane + 32 * i;
                if (e < hd) acc[i] = fmaf(pe, kv_load<T>(vb, at + e), __fmul_rn(acc[i], c));
            }
            m = m_new;
        }
        if (lane == 0) {
            s_max[warp] = m;
            s_sum[warp] = l;
        }
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; i++) {
            unsigned e = lane + 32 * i;
            if (e < hd) s_acc[warp][e] = acc[i];
        }
        __syncthreads();
        // Merge the warps in ascending order; thread e writes element e of this head.
        if (t < hd) {
            float mx = s_max[0];
#pragma unroll
            for (int w = 1; w < ATT_WARPS; w++) mx = fmaxf(mx, s_max[w]);
            // With splits the sink joins in attention_merge_f32, once.
            const bool sunk = sinks && !partial;
            float sink = sunk ? __ldg(sinks + h) : 0.0f;
            if (sunk) mx = fmaxf(mx, sink);
            float den = 0.0f, num = 0.0f;
#pragma unroll
            for (int w = 0; w < ATT_WARPS; w++) {
                // A warp with no position has max -inf and sum 0: its factor is 0.
                float f = s_max[w] == -__int_as_float(0x7f800000) ? 0.0f
                                                                   : expf(__fsub_rn(s_max[w], mx));
                den = fmaf(s_sum[w], f, den);
                num = fmaf(s_acc[w][t], f, num);
            }
            if (sunk) den = __fadd_rn(den, expf(__fsub_rn(sink, mx)));
            if (partial) {
                float* part = partial + (((size_t)r * nh + h) * splits + z) * (hd + 2);
                if (t == 0) {
                    part[0] = mx;
                    part[1] = den;
                }
                part[2 + t] = num;
            } else {
                out[((size_t)r * nh + h) * hd + t] = __fdiv_rn(num, den);
            }
        }
        __syncthreads();
    }
}

// Twin: `moe_runtime::backend::cpu::attention::attend` (one query row) with an f32 KV cache.
extern "C" __global__ void __launch_bounds__(256)
attention_decode_f32(const float* __restrict__ q, const unsigned long long* __restrict__ k_cache,
                     const unsigned long long* __restrict__ v_cache,
                     const unsigned* __restrict__ pos, unsigned window, unsigned nh, unsigned nkv,
                     unsigned hd, float scale, unsigned splits, float* __restrict__ partial,
                     float* __restrict__ out, const float* __restrict__ sinks) {
    attend_body<KV_F32>(q, k_cache, v_cache, pos, window, nh, nkv, hd, scale, splits, partial,
                      out, sinks);
}

// Twin: `moe_runtime::backend::cpu::attention::attend` (one query row) with a bf16 KV cache.
extern "C" __global__ void __launch_bounds__(256)
attention_decode_bf16(const float* __restrict__ q,
                      const unsigned long long* __restrict__ k_cache,
                      const unsigned long long* __restrict__ v_cache,
                      const unsigned* __restrict__ pos, unsigned window, unsigned nh,
                      unsigned nkv, unsigned hd, float scale, unsigned splits,
                      float* __restrict__ partial, float* __restrict__ out,
                      const float* __restrict__ sinks) {
    attend_body<KV_BF16>(q, k_cache, v_cache, pos, window, nh, nkv, hd, scale, splits, partial,
                       out, sinks);
}

// Twin: `moe_runtime::backend::cpu::attention::attend` (one query row) with an f16 KV cache.
extern "C" __global__ void __launch_bounds__(256)
attention_decode_f16(const float* __restrict__ q, const unsigned long long* __restrict__ k_cache,
                     const unsigned long long* __restrict__ v_cache,
                     const unsigned* __restrict__ pos, unsigned window, unsigned nh, unsigned nkv,
                     unsigned hd, float scale, unsigned splits, float* __restrict__ partial,
                     float* __restrict__ out, const float* __restrict__ sinks) {
    attend_body<KV_F16>(q, k_cache, v_cache, pos, window, nh, nkv, hd, scale, splits, partial,
                      out, sinks);
}

// Twin: the final normalisation of `moe_runtime::backend::cpu::attention::attend` (softmax
// denominator and weighted value sum over all attended positions), here over the splits
// written by attention_decode_* with splits > 1. Launch: block = 256 threads, grid = (rows, nh);
// thread e writes element e of head blockIdx.y of row blockIdx.x. Splits merge in ascending
// order; a split with no position (maximum -inf) contributes nothing; then the head's sink, if
// `sinks` is not null.
extern "C" __global__ void __launch_bounds__(256)
attention_merge_f32(const float* __restrict__ partial, unsigned splits, unsigned nh, unsigned hd,
                    float* __restrict__ out, const float* __restrict__ sinks) {
    unsigned r = blockIdx.x, h = blockIdx.y, e = threadIdx.x;
    if (e >= hd) return;
    const float* part = partial + ((size_t)r * nh + h) * splits * (hd + 2);
    float mx = __ldg(part);
    for (unsigned z = 1; z < splits; z++) mx = fmaxf(mx, __ldg(part + (size_t)z * (hd + 2)));
    float sink = sinks ? __ldg(sinks + h) : 0.0f;
    if (sinks) mx = fmaxf(mx, sink);
    float den = 0.0f, num = 0.0f;
    for (unsigned z = 0; z < splits; z++) {
        const float* pz = part + (size_t)z * (hd + 2);
        float m = __ldg(pz);
        float f = m == -__int_as_float(0x7f800000) ? 0.0f : expf(__fsub_rn(m, mx));
        den = fmaf(__ldg(pz + 1), f, den);
        num = fmaf(__ldg(pz + 2 + e), f, num);
    }
    if (sinks) den = __fadd_rn(den, expf(__fsub_rn(sink, mx)));
    out[((size_t)r * nh + h) * hd + e] = __fdiv_rn(num, den);
}

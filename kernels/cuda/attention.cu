// Decode attention: one query row against its sequence's KV cache, per (row, KV head), for
// grouped-query attention (the nh / nkv query heads of a KV head share its keys and values),
// with scores scaled by the layer's scale (head_dim^-0.5 for most architectures), a softmax in
// f32 with the maximum subtracted, an optional sliding window, and the KV cache in f32, bf16 or
// f16; split over positions for long contexts. Latent attention (MLA, attention_latent_*, at the
// end of this file) reads the values from the key cache: see below.
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
// `scale` is the host's `AttnShape::scale` (head_dim^-0.5 as (hd as f32).powf(-0.5), or the
// architecture's own, e.g. DeepSeek-V3's YaRN-adjusted one), the same f32 the twin uses.
// Requirements the host checks: head_dim <= ATT_MAX_HEAD_DIM, nh a multiple of nkv,
// 1 <= splits <= 65535 with `partial` non-null when splits > 1, and the caches 4-byte (f32) or
// 2-byte (bf16, f16) aligned.
// Order: warp w of a split takes its positions lo + w, lo + w + 8, ...; per warp an online
// softmax (the running maximum subtracted before every exp), the dot products summed per lane
// in ascending order then by a fixed xor-shuffle tree; the 8 warps are then merged in
// ascending order. Deterministic; within the stated tolerance of the CPU twin, whose order differs (it scores
// every position first, then subtracts the global maximum). The number of splits changes the
// order, so the host derives it from the context length alone (never from load or timing).
// Sinks (gpt-oss): `sinks` null, or one logit per query head that joins the head's softmax as a
// position without a value: after the warps (or, with splits, the splits) are merged, the
// maximum takes the sink in and the denominator adds exp(sink - maximum).
//
// Latent attention (MLA: DeepSeek-V3, Kimi-K2), attention_latent_*: the cache holds keys only
// ([tokens, nkv * head_dim], no value cache) and each query head's values are the leading
// `value_dim` values of its key row, read from the same cache rows; out is [rows, nh * value_dim]
// and `partial` [rows, nh, splits, value_dim + 2]. head_dim up to LAT_MAX_HEAD_DIM (576: a
// kv_lora_rank of 512 plus a 64-value rope key), value_dim up to LAT_MAX_VALUE_DIM (512).
// Launch: block = 256 threads, grid = (rows, ceil(nh / LAT_HEADS), splits); the 8 warps take
// LAT_HEADS query heads, LAT_WARPS_PER_HEAD warps each, so a block reads each cached row once
// for LAT_HEADS heads (the other heads of an MLA layer, which all share the one latent KV head,
// read it from L2) and the blocks of a decode step are many even with one KV head. Warp
// `sub` of a head takes positions lo + sub, lo + sub + LAT_WARPS_PER_HEAD, ...: per position
// the dot product over head_dim (18 values per lane), the online softmax, then the value sum
// over the first value_dim values of the same key row (16 per lane); the head's warps then
// merge in ascending order through shared memory (16 KiB), as the standard kernel's warps do,
// with the sink joining the same way. The block's query heads sit in shared memory (the
// registers hold the value sums). Static shared memory 20.6 KiB. Requirements the host
// checks: head_dim <= LAT_MAX_HEAD_DIM, value_dim <= min(head_dim, LAT_MAX_VALUE_DIM), nh a
// multiple of nkv, ceil(nh / LAT_HEADS) <= 65 535; as the standard kernel otherwise.
// attention_merge_f32 merges the splits for any width (it strides over the value dims).

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
// written by attention_decode_* or attention_latent_* with splits > 1 (`hd` is the width of a
// value head: head_dim, or value_dim for latent attention). Launch: block = 256 threads, grid =
// (rows, nh); thread t writes elements t, t + 256, ... of head blockIdx.y of row blockIdx.x.
// Splits merge in ascending order; a split with no position (maximum -inf) contributes
// nothing; then the head's sink, if `sinks` is not null.
extern "C" __global__ void __launch_bounds__(256)
attention_merge_f32(const float* __restrict__ partial, unsigned splits, unsigned nh, unsigned hd,
                    float* __restrict__ out, const float* __restrict__ sinks) {
    unsigned r = blockIdx.x, h = blockIdx.y;
    const float* part = partial + ((size_t)r * nh + h) * splits * (hd + 2);
    float mx = __ldg(part);
    for (unsigned z = 1; z < splits; z++) mx = fmaxf(mx, __ldg(part + (size_t)z * (hd + 2)));
    float sink = sinks ? __ldg(sinks + h) : 0.0f;
    if (sinks) mx = fmaxf(mx, sink);
    // Value widths past the block (latent attention's 512) take several elements per thread.
    for (unsigned e = threadIdx.x; e < hd; e += blockDim.x) {
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
}

#define LAT_MAX_HEAD_DIM 576
#define LAT_MAX_VALUE_DIM 512
#define LAT_Q_PER_LANE 18 // LAT_MAX_HEAD_DIM / 32
#define LAT_V_PER_LANE 16 // LAT_MAX_VALUE_DIM / 32
// Query heads per block: 2 heads of 4 warps each keeps 64 blocks per decode row at DeepSeek-V3's
// 128 heads (enough for most SMs without splits) while each cached row is read once per 2 heads.
#define LAT_HEADS 2
#define LAT_WARPS_PER_HEAD 4 // ATT_WARPS / LAT_HEADS

template <KvType T>
__device__ __forceinline__ void latent_body(const float* __restrict__ q,
                                            const unsigned long long* __restrict__ k_cache,
                                            const unsigned* __restrict__ pos, unsigned window,
                                            unsigned nh, unsigned nkv, unsigned hd, unsigned vd,
                                            float scale, unsigned splits,
                                            float* __restrict__ partial,
                                            float* __restrict__ out,
                                            const float* __restrict__ sinks) {
    __shared__ float s_max[ATT_WARPS], s_sum[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][LAT_MAX_VALUE_DIM];
    __shared__ float s_q[LAT_HEADS][LAT_MAX_HEAD_DIM];
    unsigned r = blockIdx.x, t = threadIdx.x, lane = t & 31, warp = t >> 5;
    unsigned slot = warp / LAT_WARPS_PER_HEAD, sub = warp % LAT_WARPS_PER_HEAD;
    unsigned h = blockIdx.y * LAT_HEADS + slot;
    unsigned group = nh / nkv, p = __ldg(pos + r);
    unsigned first = window > 0 && p + 1 > window ? p + 1 - window : 0;
    unsigned n = p + 1 - first, chunk = (n + splits - 1) / splits, z = blockIdx.z;
    unsigned lo = first + (z * chunk < n ? z * chunk : n);
    unsigned hi = lo + chunk < p + 1 ? lo + chunk : p + 1;
    // A warp past the last head scores nothing (its state stays empty) but joins the barrier.
    if (h >= nh) hi = lo;
    size_t kvr = (size_t)nkv * hd;
    const void* kb = (const void*)__ldg(k_cache + r);
    size_t head_off = (size_t)(h < nh ? h / group : 0) * hd;
    // The block's query heads in shared memory (registers hold the value sums).
    for (unsigned i = t; i < LAT_HEADS * hd; i += blockDim.x) {
        unsigned sl = i / hd, hq = blockIdx.y * LAT_HEADS + sl;
        unsigned e = i - sl * hd;
        s_q[sl][e] = hq < nh ? __ldg(q + ((size_t)r * nh + hq) * hd + e) : 0.0f;
    }
    __syncthreads();
    const float* qv = s_q[slot];
    float acc[LAT_V_PER_LANE];
#pragma unroll
    for (int i = 0; i < LAT_V_PER_LANE; i++) acc[i] = 0.0f;
    float m = -__int_as_float(0x7f800000), l = 0.0f;
#pragma unroll 1
    for (unsigned tok = lo + sub; tok < hi; tok += LAT_WARPS_PER_HEAD) {
        size_t at = (size_t)tok * kvr + head_off;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < LAT_Q_PER_LANE; i++) {
            unsigned e = lane + 32 * i;
            if (e < hd) dot = fmaf(qv[e], kv_load<T>(kb, at + e), dot);
        }
        float s = __fmul_rn(att_warp_sum(dot), scale);
        float m_new = fmaxf(m, s);
        float c = expf(__fsub_rn(m, m_new)), pe = expf(__fsub_rn(s, m_new));
        l = fmaf(l, c, pe);
        // The values are the key row's leading vd values (read again: cached by now).
#pragma unroll
        for (int i = 0; i < LAT_V_PER_LANE; i++) {
            unsigned e = lane + 32 * i;
            if (e < vd) acc[i] = fmaf(pe, kv_load<T>(kb, at + e), __fmul_rn(acc[i], c));
        }
        m = m_new;
    }
    if (lane == 0) {
        s_max[warp] = m;
        s_sum[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < LAT_V_PER_LANE; i++) {
        unsigned e = lane + 32 * i;
        if (e < vd) s_acc[warp][e] = acc[i];
    }
    __syncthreads();
    // Merge each head's warps in ascending order: thread t takes (head slot, element) pairs
    // t, t + 256, ... of the block's LAT_HEADS * vd outputs.
    for (unsigned i = t; i < LAT_HEADS * vd; i += blockDim.x) {
        unsigned sl = i / vd, e = i - sl * vd, hh = blockIdx.y * LAT_HEADS + sl;
        if (hh >= nh) break;
        unsigned w0 = sl * LAT_WARPS_PER_HEAD;
        float mx = s_max[w0];
#pragma unroll
        for (int w = 1; w < LAT_WARPS_PER_HEAD; w++) mx = fmaxf(mx, s_max[w0 + w]);
        const bool sunk = sinks && !partial;
        float sink = sunk ? __ldg(sinks + hh) : 0.0f;
        if (sunk) mx = fmaxf(mx, sink);
        float den = 0.0f, num = 0.0f;
#pragma unroll
        for (int w = 0; w < LAT_WARPS_PER_HEAD; w++) {
            float mw = s_max[w0 + w];
            float f = mw == -__int_as_float(0x7f800000) ? 0.0f : expf(__fsub_rn(mw, mx));
            den = fmaf(s_sum[w0 + w], f, den);
            num = fmaf(s_acc[w0 + w][e], f, num);
        }
        if (sunk) den = __fadd_rn(den, expf(__fsub_rn(sink, mx)));
        if (partial) {
            // An empty split (no position) writes maximum -inf, sum 0 and zeros.
            float* part = partial + (((size_t)r * nh + hh) * splits + z) * (vd + 2);
            if (e == 0) {
                part[0] = mx;
                part[1] = den;
            }
            part[2 + e] = num;
        } else {
            out[((size_t)r * nh + hh) * vd + e] = __fdiv_rn(num, den);
        }
    }
}

// Twin: `moe_runtime::backend::cpu::attention::attend` without values (latent attention, one
// query row) with an f32 cache.
extern "C" __global__ void __launch_bounds__(256)
attention_latent_f32(const float* __restrict__ q, const unsigned long long* __restrict__ k_cache,
                     const unsigned* __restrict__ pos, unsigned window, unsigned nh,
                     unsigned nkv, unsigned hd, unsigned vd, float scale, unsigned splits,
                     float* __restrict__ partial, float* __restrict__ out,
                     const float* __restrict__ sinks) {
    latent_body<KV_F32>(q, k_cache, pos, window, nh, nkv, hd, vd, scale, splits, partial, out,
                        sinks);
}

// Twin: `moe_runtime::backend::cpu::attention::attend` without values with a bf16 cache.
extern "C" __global__ void __launch_bounds__(256)
attention_latent_bf16(const float* __restrict__ q,
                      const unsigned long long* __restrict__ k_cache,
                      const unsigned* __restrict__ pos, unsigned window, unsigned nh,
                      unsigned nkv, unsigned hd, unsigned vd, float scale, unsigned splits,
                      float* __restrict__ partial, float* __restrict__ out,
                      const float* __restrict__ sinks) {
    latent_body<KV_BF16>(q, k_cache, pos, window, nh, nkv, hd, vd, scale, splits, partial, out,
                         sinks);
}

// Twin: `moe_runtime::backend::cpu::attention::attend` without values with an f16 cache.
extern "C" __global__ void __launch_bounds__(256)
attention_latent_f16(const float* __restrict__ q, const unsigned long long* __restrict__ k_cache,
                     const unsigned* __restrict__ pos, unsigned window, unsigned nh,
                     unsigned nkv, unsigned hd, unsigned vd, float scale, unsigned splits,
                     float* __restrict__ partial, float* __restrict__ out,
                     const float* __restrict__ sinks) {
    latent_body<KV_F16>(q, k_cache, pos, window, nh, nkv, hd, vd, scale, splits, partial, out,
                        sinks);
}

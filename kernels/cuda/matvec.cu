// Decode matvec: out[m, n] = x[m, k] · W[n, k]ᵀ for few activation rows, W in f32, bf16, f16,
// GGML q8_0, GGML q4_k, FP8 E4M3, NF4 or FP4 (block layouts of kernels/src/quant.rs: BlockQ8_0
// is a little-endian f16 `d` then 32 i8 quants, 34 bytes; BlockQ4K is f16 `d`, f16 `dmin`, 12
// bytes of packed 6-bit scales / mins, then 128 bytes of nibbles, 144 bytes; and of
// kernels/src/prequant.rs: BlockF8 is an f32 `d` then 128 E4M3 codes, 132 bytes; BlockNf4 /
// BlockFp4 are an f32 `d` then 32 bytes of 4-bit codes, high nibble first, 36 bytes; BlockMxfp4
// is an E8M0 scale byte then 16 bytes of E2M1 codes, low nibble first, 17 bytes).
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads (8 warps), grid = ceil(n / 8). Warp w of block b computes output
// column j = 8b + w for every activation row, so each weight row is read once for up to 8
// activation rows (rows beyond 8 run in further groups of 8, re-reading the weights).
// Requirements the host checks: k a multiple of the block size (32 for q8_0, 256 for q4_k, 128
// for FP8, 64 for NF4 / FP4, 32 for MXFP4); for the block formats, x 16-byte aligned (device allocations are
// 256-byte aligned; x is read as float4, scalar fallbacks there would cost registers past the
// budget) and W 2-byte (q8_0) or 4-byte (q4_k, FP8, NF4, FP4) aligned (MXFP4: any, read as
// bytes). f32 / bf16 / f16 use
// 16-byte loads when x and W are 16-byte aligned and k a multiple of 4 (f32) or 8 (bf16, f16),
// scalar loads otherwise.
// Arithmetic: weights are widened exactly as the CPU twins do (bf16: bits << 16; f16:
// cvt.f32.f16; q8_0: d * q; q4_k: (d * sc) * q - dmin * m, unfused; FP8 / NF4 / FP4:
// d * TABLE[code] through the tables of kernels/src/prequant.rs), products accumulate in f32
// with FMA per lane in a fixed order, then a fixed xor-shuffle tree: deterministic, and within
// the stated tolerance of the CPU twin (whose summation order differs).

#define MV_MAX_ROWS 8
#define QK8_0_VALUES 32
#define Q8_0_BYTES 34
#define QK_K_VALUES 256
#define Q4_K_BYTES 144
#define QK_F8_VALUES 128
#define F8_BYTES 132
#define QK_B4_VALUES 64
#define B4_BYTES 36
#define QK_MX_VALUES 32
#define MX_BYTES 17

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

// Four consecutive floats, as one 16-byte load when `vec`.
__device__ __forceinline__ float4 ld4(const float* __restrict__ p, bool vec) {
    if (vec) return __ldg((const float4*)p);
    return make_float4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
}

template <int M>
__device__ __forceinline__ void fma4(float (&acc)[M], const float* __restrict__ x, unsigned k,
                                     size_t col, bool vec, float w0, float w1, float w2,
                                     float w3) {
#pragma unroll
    for (int r = 0; r < M; r++) {
        float4 a = ld4(x + (size_t)r * k + col, vec);
        acc[r] = fmaf(a.x, w0, acc[r]);
        acc[r] = fmaf(a.y, w1, acc[r]);
        acc[r] = fmaf(a.z, w2, acc[r]);
        acc[r] = fmaf(a.w, w3, acc[r]);
    }
}

template <int M>
__device__ __forceinline__ void store_rows(float (&acc)[M], float* __restrict__ out,
                                           unsigned n, unsigned j, unsigned lane) {
#pragma unroll
    for (int r = 0; r < M; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0) out[(size_t)r * n + j] = s;
    }
}

template <int M>
__device__ __forceinline__ void mv_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ out, unsigned n, unsigned k,
                                       unsigned j, unsigned lane) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    const float* row = w + (size_t)j * k;
    if (k % 4 == 0 && aligned16(w) && aligned16(x)) {
#pragma unroll 1
        for (unsigned i = lane; i < k / 4; i += 32) {
            float4 v = __ldg((const float4*)row + i);
            fma4<M>(acc, x, k, (size_t)i * 4, true, v.x, v.y, v.z, v.w);
        }
    } else {
        for (unsigned i = lane; i < k; i += 32) {
            float v = __ldg(row + i);
#pragma unroll
            for (int r = 0; r < M; r++) acc[r] = fmaf(__ldg(x + (size_t)r * k + i), v, acc[r]);
        }
    }
    store_rows<M>(acc, out, n, j, lane);
}

// Eight 16-bit weights of one 16-byte load, widened: bf16 (`F16` false) or f16.
template <bool F16>
__device__ __forceinline__ float wide16(unsigned bits) {
    if (F16) return f16_to_f32((unsigned short)bits);
    return __uint_as_float(bits << 16);
}

template <int M, bool F16>
__device__ __forceinline__ void mv_half(const float* __restrict__ x,
                                        const unsigned short* __restrict__ w,
                                        float* __restrict__ out, unsigned n, unsigned k,
                                        unsigned j, unsigned lane) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    const unsigned short* row = w + (size_t)j * k;
    if (k % 8 == 0 && aligned16(w) && aligned16(x)) {
#pragma unroll 1
        for (unsigned i = lane; i < k / 8; i += 32) {
            uint4 v = __ldg((const uint4*)row + i);
            size_t col = (size_t)i * 8;
            fma4<M>(acc, x, k, col, true, wide16<F16>(v.x & 0xffffu), wide16<F16>(v.x >> 16),
                    wide16<F16>(v.y & 0xffffu), wide16<F16>(v.y >> 16));
            fma4<M>(acc, x, k, col + 4, true, wide16<F16>(v.z & 0xffffu),
                    wide16<F16>(v.z >> 16), wide16<F16>(v.w & 0xffffu), wide16<F16>(v.w >> 16));
        }
    } else {
        for (unsigned i = lane; i < k; i += 32) {
            float v = wide16<F16>(__ldg(row + i));
#pragma unroll
            for (int r = 0; r < M; r++) acc[r] = fmaf(__ldg(x + (size_t)r * k + i), v, acc[r]);
        }
    }
    store_rows<M>(acc, out, n, j, lane);
}

// q8_0: lanes 8g..8g+7 take block b = g, g + 4, ...; lane 8g + p takes quants 4p..4p+3.
template <int M>
__device__ __forceinline__ void mv_q8_0(const float* __restrict__ x,
                                        const unsigned char* __restrict__ w,
                                        float* __restrict__ out, unsigned n, unsigned k,
                                        unsigned j, unsigned lane) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    unsigned nb = k / QK8_0_VALUES;
    const unsigned char* row = w + (size_t)j * nb * Q8_0_BYTES;
    unsigned g = lane >> 3, p = lane & 7;
#pragma unroll 1
    for (unsigned b = g; b < nb; b += 4) {
        const unsigned char* blk = row + (size_t)b * Q8_0_BYTES;
        float d = f16_to_f32(__ldg((const unsigned short*)blk));
        const unsigned short* qp = (const unsigned short*)(blk + 2 + 4 * p);
        unsigned short q01 = __ldg(qp), q23 = __ldg(qp + 1);
        fma4<M>(acc, x, k, (size_t)b * QK8_0_VALUES + 4 * p, true,
                __fmul_rn(d, (float)(signed char)(q01 & 0xff)),
                __fmul_rn(d, (float)(signed char)(q01 >> 8)),
                __fmul_rn(d, (float)(signed char)(q23 & 0xff)),
                __fmul_rn(d, (float)(signed char)(q23 >> 8)));
    }
    store_rows<M>(acc, out, n, j, lane);
}

// GGML's get_scale_min_k4 (`BlockQ4K::scale_min`): the six-bit (scale, min) of sub-block s of
// a q4_k block, from its 12 scale bytes held as three little-endian words.
__device__ __forceinline__ void q4k_scale_min_w(unsigned s0, unsigned s1, unsigned s2,
                                                unsigned s, unsigned* sc, unsigned* m) {
    unsigned sh = 8 * (s & 3);
    if (s < 4) {
        *sc = (s0 >> sh) & 63;
        *m = (s1 >> sh) & 63;
    } else {
        *sc = ((s2 >> sh) & 0x0F) | (((s0 >> sh) >> 6 & 3) << 4);
        *m = ((s2 >> sh) >> 4 & 0x0F) | (((s1 >> sh) >> 6 & 3) << 4);
    }
}

// q4_k: the warp takes one block at a time; lane 8c + p reads nibble bytes 32c + 4p..+3, that
// is weights 64c + 4p..+3 (low nibbles, sub-block 2c) and 64c + 32 + 4p..+3 (high nibbles,
// sub-block 2c + 1).
template <int M>
__device__ __forceinline__ void mv_q4_k(const float* __restrict__ x,
                                        const unsigned char* __restrict__ w,
                                        float* __restrict__ out, unsigned n, unsigned k,
                                        unsigned j, unsigned lane) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    unsigned nb = k / QK_K_VALUES;
    const unsigned char* row = w + (size_t)j * nb * Q4_K_BYTES;
    unsigned c = lane >> 3, p = lane & 7;
#pragma unroll 1
    for (unsigned b = 0; b < nb; b++) {
        const unsigned char* blk = row + (size_t)b * Q4_K_BYTES;
        unsigned dd = __ldg((const unsigned*)blk);
        float d = f16_to_f32((unsigned short)(dd & 0xffffu));
        float dmin = f16_to_f32((unsigned short)(dd >> 16));
        // The 12 scale bytes as three words: s0 = scales[0..4], s1 = [4..8], s2 = [8..12].
        unsigned s0 = __ldg((const unsigned*)(blk + 4)), s1 = __ldg((const unsigned*)(blk + 8)),
                 s2 = __ldg((const unsigned*)(blk + 12));
        unsigned sc1, m1, sc2, m2;
        q4k_scale_min_w(s0, s1, s2, 2 * c, &sc1, &m1);
        q4k_scale_min_w(s0, s1, s2, 2 * c + 1, &sc2, &m2);
        float d1 = __fmul_rn(d, (float)sc1), mn1 = __fmul_rn(dmin, (float)m1);
        float d2 = __fmul_rn(d, (float)sc2), mn2 = __fmul_rn(dmin, (float)m2);
        unsigned qv = __ldg((const unsigned*)(blk + 16 + 32 * c + 4 * p));
        size_t col = (size_t)b * QK_K_VALUES + 64 * c + 4 * p;
        fma4<M>(acc, x, k, col, true,
                __fsub_rn(__fmul_rn(d1, (float)(qv & 15)), mn1),
                __fsub_rn(__fmul_rn(d1, (float)((qv >> 8) & 15)), mn1),
                __fsub_rn(__fmul_rn(d1, (float)((qv >> 16) & 15)), mn1),
                __fsub_rn(__fmul_rn(d1, (float)((qv >> 24) & 15)), mn1));
        fma4<M>(acc, x, k, col + 32, true,
                __fsub_rn(__fmul_rn(d2, (float)((qv >> 4) & 15)), mn2),
                __fsub_rn(__fmul_rn(d2, (float)((qv >> 12) & 15)), mn2),
                __fsub_rn(__fmul_rn(d2, (float)((qv >> 20) & 15)), mn2),
                __fsub_rn(__fmul_rn(d2, (float)(qv >> 28)), mn2));
    }
    store_rows<M>(acc, out, n, j, lane);
}

template <int M>
__device__ __forceinline__ void mv_bf16(const float* __restrict__ x,
                                        const unsigned short* __restrict__ w,
                                        float* __restrict__ out, unsigned n, unsigned k,
                                        unsigned j, unsigned lane) {
    mv_half<M, false>(x, w, out, n, k, j, lane);
}

template <int M>
__device__ __forceinline__ void mv_f16(const float* __restrict__ x,
                                       const unsigned short* __restrict__ w,
                                       float* __restrict__ out, unsigned n, unsigned k,
                                       unsigned j, unsigned lane) {
    mv_half<M, true>(x, w, out, n, k, j, lane);
}

// FP8: the warp takes one block at a time; lane p reads codes 4p..4p+3 (one 4-byte load).
template <int M>
__device__ __forceinline__ void mv_f8(const float* __restrict__ x,
                                      const unsigned char* __restrict__ w,
                                      float* __restrict__ out, unsigned n, unsigned k, unsigned j,
                                      unsigned lane) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    unsigned nb = k / QK_F8_VALUES;
    const unsigned char* row = w + (size_t)j * nb * F8_BYTES;
#pragma unroll 1
    for (unsigned b = 0; b < nb; b++) {
        const unsigned char* blk = row + (size_t)b * F8_BYTES;
        float d = __ldg((const float*)blk);
        unsigned q = __ldg((const unsigned*)(blk + 4 + 4 * lane));
        fma4<M>(acc, x, k, (size_t)b * QK_F8_VALUES + 4 * lane, true,
                __fmul_rn(d, e4m3_to_f32(q & 0xff)), __fmul_rn(d, e4m3_to_f32((q >> 8) & 0xff)),
                __fmul_rn(d, e4m3_to_f32((q >> 16) & 0xff)), __fmul_rn(d, e4m3_to_f32(q >> 24)));
    }
    store_rows<M>(acc, out, n, j, lane);
}

// NF4 / FP4: lanes 16g..16g+15 take block b = g, g + 2, ...; lane 16g + p reads code bytes 2p,
// 2p + 1 (one 2-byte load), that is weights 4p..4p+3 (high nibble first). `table` is the code
// table in shared memory: the 16 entries sit in 16 banks, so the lanes' lookups never conflict
// (constant memory would serialize a warp's distinct addresses).
// R rounds each weight after the multiply (0 none, 1 bf16, 2 f16: `round_to`).
template <int M, unsigned R>
__device__ __forceinline__ void mv_b4(const float* __restrict__ x,
                                      const unsigned char* __restrict__ w,
                                      float* __restrict__ out, unsigned n, unsigned k, unsigned j,
                                      unsigned lane, const float* table) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    unsigned nb = k / QK_B4_VALUES;
    const unsigned char* row = w + (size_t)j * nb * B4_BYTES;
    unsigned g = lane >> 4, p = lane & 15;
#pragma unroll 1
    for (unsigned b = g; b < nb; b += 2) {
        const unsigned char* blk = row + (size_t)b * B4_BYTES;
        float d = __ldg((const float*)blk);
        unsigned q = __ldg((const unsigned short*)(blk + 4 + 2 * p));
        fma4<M>(acc, x, k, (size_t)b * QK_B4_VALUES + 4 * p, true,
                round_to(__fmul_rn(d, table[(q >> 4) & 15]), R),
                round_to(__fmul_rn(d, table[q & 15]), R),
                round_to(__fmul_rn(d, table[(q >> 12) & 15]), R),
                round_to(__fmul_rn(d, table[(q >> 8) & 15]), R));
    }
    store_rows<M>(acc, out, n, j, lane);
}

// MXFP4: lanes 8g..8g+7 take block b = g, g + 4, ...; lane 8g + p reads code bytes 2p, 2p + 1
// (byte loads: blocks are 17 bytes, unaligned), that is weights 4p..4p+3 (low nibble first),
// and the block's scale byte. Products are exact (power-of-two scales) unless they overflow.
template <int M>
__device__ __forceinline__ void mv_mxfp4(const float* __restrict__ x,
                                         const unsigned char* __restrict__ w,
                                         float* __restrict__ out, unsigned n, unsigned k,
                                         unsigned j, unsigned lane) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    unsigned nb = k / QK_MX_VALUES;
    const unsigned char* row = w + (size_t)j * nb * MX_BYTES;
    unsigned g = lane >> 3, p = lane & 7;
#pragma unroll 1
    for (unsigned b = g; b < nb; b += 4) {
        const unsigned char* blk = row + (size_t)b * MX_BYTES;
        float d = e8m0_to_f32(__ldg(blk));
        unsigned q0 = __ldg(blk + 1 + 2 * p), q1 = __ldg(blk + 2 + 2 * p);
        fma4<M>(acc, x, k, (size_t)b * QK_MX_VALUES + 4 * p, true,
                __fmul_rn(d, e2m1_to_f32(q0 & 15)), __fmul_rn(d, e2m1_to_f32(q0 >> 4)),
                __fmul_rn(d, e2m1_to_f32(q1 & 15)), __fmul_rn(d, e2m1_to_f32(q1 >> 4)));
    }
    store_rows<M>(acc, out, n, j, lane);
}

enum Format { F32, BF16, F16, Q8_0, Q4_K, F8, NF4, FP4, MXFP4, B4_BF16, B4_F16 };

template <Format F, int M>
__device__ __forceinline__ void mv_body(const float* __restrict__ x, const void* __restrict__ w,
                                        float* __restrict__ out, unsigned n, unsigned k,
                                        unsigned j, unsigned lane, const float* table) {
    if constexpr (F == F32) mv_f32<M>(x, (const float*)w, out, n, k, j, lane);
    if constexpr (F == BF16) mv_bf16<M>(x, (const unsigned short*)w, out, n, k, j, lane);
    if constexpr (F == F16) mv_f16<M>(x, (const unsigned short*)w, out, n, k, j, lane);
    if constexpr (F == Q8_0) mv_q8_0<M>(x, (const unsigned char*)w, out, n, k, j, lane);
    if constexpr (F == Q4_K) mv_q4_k<M>(x, (const unsigned char*)w, out, n, k, j, lane);
    if constexpr (F == F8) mv_f8<M>(x, (const unsigned char*)w, out, n, k, j, lane);
    if constexpr (F == NF4) mv_b4<M, 0>(x, (const unsigned char*)w, out, n, k, j, lane, table);
    if constexpr (F == FP4) mv_b4<M, 0>(x, (const unsigned char*)w, out, n, k, j, lane, table);
    // Rounded NF4 / FP4 (the table in shared memory names which).
    if constexpr (F == B4_BF16) mv_b4<M, 1>(x, (const unsigned char*)w, out, n, k, j, lane, table);
    if constexpr (F == B4_F16) mv_b4<M, 2>(x, (const unsigned char*)w, out, n, k, j, lane, table);
    if constexpr (F == MXFP4) mv_mxfp4<M>(x, (const unsigned char*)w, out, n, k, j, lane);
}

// The body of every entry point: warp -> output column j, then groups of up to 8 activation
// rows, each run by the body compiled for exactly that many rows.
template <Format F>
__device__ __forceinline__ void mv_entry(const float* __restrict__ x,
                                         const void* __restrict__ w, float* __restrict__ out,
                                         unsigned m, unsigned n, unsigned k,
                                         const float* table = nullptr) {
    unsigned lane = threadIdx.x & 31;
    unsigned j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    for (unsigned r0 = 0; r0 < m; r0 += MV_MAX_ROWS) {
        const float* xr = x + (size_t)r0 * k;
        float* o = out + (size_t)r0 * n;
        unsigned rows = m - r0 < MV_MAX_ROWS ? m - r0 : MV_MAX_ROWS;
        switch (rows) {
        case 1: mv_body<F, 1>(xr, w, o, n, k, j, lane, table); break;
        case 2: mv_body<F, 2>(xr, w, o, n, k, j, lane, table); break;
        case 3: mv_body<F, 3>(xr, w, o, n, k, j, lane, table); break;
        case 4: mv_body<F, 4>(xr, w, o, n, k, j, lane, table); break;
        case 5: mv_body<F, 5>(xr, w, o, n, k, j, lane, table); break;
        case 6: mv_body<F, 6>(xr, w, o, n, k, j, lane, table); break;
        case 7: mv_body<F, 7>(xr, w, o, n, k, j, lane, table); break;
        default: mv_body<F, 8>(xr, w, o, n, k, j, lane, table); break;
        }
    }
}

// Twin: `moe_kernels::matmul` on `Weights::F32` (reference: `moe_kernels::scalar::matmul`).
extern "C" __global__ void __launch_bounds__(256)
matvec_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
           unsigned m, unsigned n, unsigned k) {
    mv_entry<F32>(x, w, out, m, n, k);
}

// Twin: `moe_kernels::matmul` on `Weights::Bf16` (reference: `moe_kernels::scalar::matmul`).
extern "C" __global__ void __launch_bounds__(256)
matvec_bf16(const float* __restrict__ x, const unsigned short* __restrict__ w,
            float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    mv_entry<BF16>(x, w, out, m, n, k);
}

// Twin: `moe_kernels::matmul` on `Weights::F16` (reference: `moe_kernels::scalar::matmul`).
extern "C" __global__ void __launch_bounds__(256)
matvec_f16(const float* __restrict__ x, const unsigned short* __restrict__ w,
           float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    mv_entry<F16>(x, w, out, m, n, k);
}

// Twin: `moe_kernels::matmul` on `Weights::Q8_0` (dequantize_row_q8_0, then the f32 kernel).
extern "C" __global__ void __launch_bounds__(256)
matvec_q8_0(const float* __restrict__ x, const unsigned char* __restrict__ w,
            float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    mv_entry<Q8_0>(x, w, out, m, n, k);
}

// Twin: `moe_kernels::matmul` on `Weights::Q4K` (dequantize_row_q4_k, then the f32 kernel).
extern "C" __global__ void __launch_bounds__(256)
matvec_q4_k(const float* __restrict__ x, const unsigned char* __restrict__ w,
            float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    mv_entry<Q4_K>(x, w, out, m, n, k);
}

// Twin: `moe_kernels::matmul` on `Weights::F8` (dequantize_row_f8, then the f32 kernel).
extern "C" __global__ void __launch_bounds__(256)
matvec_f8(const float* __restrict__ x, const unsigned char* __restrict__ w,
          float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    mv_entry<F8>(x, w, out, m, n, k);
}

// Twin: `moe_kernels::matmul` on `Weights::Nf4` (dequantize_row_nf4, then the f32 kernel).
extern "C" __global__ void __launch_bounds__(256)
matvec_nf4(const float* __restrict__ x, const unsigned char* __restrict__ w,
           float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(NF4_BITS[threadIdx.x]);
    __syncthreads();
    mv_entry<NF4>(x, w, out, m, n, k, table);
}

// Twin: `moe_kernels::matmul` on `Weights::Fp4` (dequantize_row_fp4, then the f32 kernel).
extern "C" __global__ void __launch_bounds__(256)
matvec_fp4(const float* __restrict__ x, const unsigned char* __restrict__ w,
           float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(FP4_BITS[threadIdx.x]);
    __syncthreads();
    mv_entry<FP4>(x, w, out, m, n, k, table);
}

// Twins: `moe_kernels::matmul` on `Weights::Rounded4` (dequantize_row_rounded4, then the f32
// kernel): NF4 / FP4 weights rounded to bf16 or f16 after the multiply.
extern "C" __global__ void __launch_bounds__(256)
matvec_nf4bf16(const float* __restrict__ x, const unsigned char* __restrict__ w,
               float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(NF4_BITS[threadIdx.x]);
    __syncthreads();
    mv_entry<B4_BF16>(x, w, out, m, n, k, table);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_nf4f16(const float* __restrict__ x, const unsigned char* __restrict__ w,
              float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(NF4_BITS[threadIdx.x]);
    __syncthreads();
    mv_entry<B4_F16>(x, w, out, m, n, k, table);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_fp4bf16(const float* __restrict__ x, const unsigned char* __restrict__ w,
               float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(FP4_BITS[threadIdx.x]);
    __syncthreads();
    mv_entry<B4_BF16>(x, w, out, m, n, k, table);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_fp4f16(const float* __restrict__ x, const unsigned char* __restrict__ w,
              float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(FP4_BITS[threadIdx.x]);
    __syncthreads();
    mv_entry<B4_F16>(x, w, out, m, n, k, table);
}


// Twin: `moe_kernels::matmul` on `Weights::Mxfp4` (dequantize_row_mxfp4, then the f32 kernel).
extern "C" __global__ void __launch_bounds__(256)
matvec_mxfp4(const float* __restrict__ x, const unsigned char* __restrict__ w,
             float* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    mv_entry<MXFP4>(x, w, out, m, n, k);
}

// Grouped decode matvec: the experts of one layer in one launch. Block row y takes entry y of
// `table` (four 64-bit words per entry: the addresses of the weight, of the entry's first
// activation row and of its first output row, and its row count m, at most 8: the host splits
// an expert's rows into entries of up to 8): out_y[r, :] = x_y[r, :] · W_yᵀ for its m rows,
// exactly as the single-weight kernel computes a group of m rows (the same body, so the same
// order and results). `x` and `out` name the buffers the entries point into.
// Launch: block = 256 threads, grid = (ceil(n / 8), entries). Requirements the host checks:
// those of the single-weight kernel for every entry (each x_y 16-byte aligned for the block
// formats: whole rows of k into x, k a multiple of the block size), 1 <= m <= 8,
// entries <= 65 535.
// Twin: `moe_kernels::matmul` per entry, as the single-weight kernels.
template <Format F>
__device__ __forceinline__ void mv_grouped(const unsigned long long* __restrict__ table,
                                           unsigned n, unsigned k, const float* tab = nullptr) {
    const unsigned long long* e = table + 4 * (size_t)blockIdx.y;
    unsigned lane = threadIdx.x & 31;
    unsigned j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    const float* x = (const float*)__ldg(e + 1);
    const void* w = (const void*)__ldg(e);
    float* o = (float*)__ldg(e + 2);
    switch ((unsigned)__ldg(e + 3)) {
    case 1: mv_body<F, 1>(x, w, o, n, k, j, lane, tab); break;
    case 2: mv_body<F, 2>(x, w, o, n, k, j, lane, tab); break;
    case 3: mv_body<F, 3>(x, w, o, n, k, j, lane, tab); break;
    case 4: mv_body<F, 4>(x, w, o, n, k, j, lane, tab); break;
    case 5: mv_body<F, 5>(x, w, o, n, k, j, lane, tab); break;
    case 6: mv_body<F, 6>(x, w, o, n, k, j, lane, tab); break;
    case 7: mv_body<F, 7>(x, w, o, n, k, j, lane, tab); break;
    case 8: mv_body<F, 8>(x, w, o, n, k, j, lane, tab); break;
    default: break;
    }
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_f32(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                   float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<F32>(table, n, k);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_bf16(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                    float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<BF16>(table, n, k);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_f16(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                   float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<F16>(table, n, k);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_q8_0(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                    float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<Q8_0>(table, n, k);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_q4_k(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                    float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<Q4_K>(table, n, k);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_f8(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                  float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<F8>(table, n, k);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_nf4(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                   float* __restrict__ out, unsigned n, unsigned k) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(NF4_BITS[threadIdx.x]);
    __syncthreads();
    mv_grouped<NF4>(table, n, k, tab);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_fp4(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                   float* __restrict__ out, unsigned n, unsigned k) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(FP4_BITS[threadIdx.x]);
    __syncthreads();
    mv_grouped<FP4>(table, n, k, tab);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_mxfp4(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                     float* __restrict__ out, unsigned n, unsigned k) {
    mv_grouped<MXFP4>(table, n, k);
}

// Twins: `moe_kernels::matmul` per entry on `Weights::Rounded4`, as matvec_nf4bf16 and its
// siblings.

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_nf4bf16(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                       float* __restrict__ out, unsigned n, unsigned k) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(NF4_BITS[threadIdx.x]);
    __syncthreads();
    mv_grouped<B4_BF16>(table, n, k, tab);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_nf4f16(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                      float* __restrict__ out, unsigned n, unsigned k) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(NF4_BITS[threadIdx.x]);
    __syncthreads();
    mv_grouped<B4_F16>(table, n, k, tab);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_fp4bf16(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                       float* __restrict__ out, unsigned n, unsigned k) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(FP4_BITS[threadIdx.x]);
    __syncthreads();
    mv_grouped<B4_BF16>(table, n, k, tab);
}

extern "C" __global__ void __launch_bounds__(256)
matvec_grouped_fp4f16(const unsigned long long* __restrict__ table, const float* __restrict__ x,
                      float* __restrict__ out, unsigned n, unsigned k) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(FP4_BITS[threadIdx.x]);
    __syncthreads();
    mv_grouped<B4_F16>(table, n, k, tab);
}

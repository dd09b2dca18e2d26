// Device helpers shared by every kernel source. The sources are header-free (NVRTC has no
// CUDA headers built in), so kernels/src/cuda.rs prepends this text to each source before it is
// compiled (`CudaSource::program`); nothing here is an entry point.

// f16 -> f32, exact (`cvt.f32.f16`).
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

// `v` rounded to bf16 (r = 1) or f16 (r = 2), to nearest with ties to even, and widened back
// (r = 0: unchanged): a bitsandbytes weight rounded to its quant state's dtype
// (`moe_kernels::Round4::apply`). bf16: add 0x7FFF plus the kept part's lowest bit and clear the
// low 16 bits (finite values; an overflow rounds to infinity, as on the CPU); f16: cvt.rn.
__device__ __forceinline__ float round_to(float v, unsigned r) {
    if (r == 1) {
        unsigned b = __float_as_uint(v);
        return __uint_as_float((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
    }
    if (r == 2) {
        unsigned short h;
        asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(v));
        return f16_to_f32(h);
    }
    return v;
}

// Sum over the 32 lanes of a warp, in a fixed butterfly order (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// The f32 bits of every E4M3 code (`moe_kernels::prequant::E4M3_TO_F32`), computed from
// v = code & 0x7F as that table's documentation states: for v >= 8, (v << 20) + (120 << 23)
// (exponent rebiased from 7 to 127); for v < 8, v * 2^-9 (exact); for v == 0x7F, 0x7FC00000;
// then the sign bit (code & 0x80) << 24.
__device__ __forceinline__ float e4m3_to_f32(unsigned code) {
    unsigned v = code & 0x7Fu;
    unsigned bits = v >= 8 ? (v << 20) + (120u << 23) : __float_as_uint((float)v * 0.001953125f);
    bits = v == 0x7Fu ? 0x7FC00000u : bits;
    return __uint_as_float(bits | ((code & 0x80u) << 24));
}

// `moe_kernels::prequant::NF4_TABLE` and `FP4_TABLE` as f32 bits (bitsandbytes 0.50's code
// values; kernels/src/cuda.rs tests that these lines equal the Rust tables bit for bit).
__constant__ unsigned NF4_BITS[16] = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u,
    0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u};
__constant__ unsigned FP4_BITS[16] = {
    0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, 0x3e2aaaabu, 0x3e800000u,
    0x00000000u, 0xbbaaaaabu, 0xbf2aaaabu, 0xbf800000u, 0xbeaaaaabu, 0xbf000000u, 0xbe2aaaabu, 0xbe800000u};

// MXFP4 (`moe_kernels::prequant::BlockMxfp4`): the value of E2M1 code `c` (`MXFP4_TABLE`),
// exactly: the 3 magnitude bits put at bits 22..24 of an f32 are its exponent and mantissa
// with a bias of 127 instead of 1 (m = 1, the format's subnormal 0.5, lands on the f32
// subnormal 2^-127), so times 2^126 they are the value; the sign bit 3 moves to bit 31 (code 8 is
// -0.0). No table: no shared memory or constant lookups, and few registers.
__device__ __forceinline__ float e2m1_to_f32(unsigned c) {
    return __fmul_rn(__uint_as_float(((c & 7u) << 22) | ((c & 8u) << 28)), 8.507059173023462e37f);
}

// The E8M0 scale byte's value `moe_kernels::prequant::e8m0_to_f32`: 2^(e - 127) (e = 0 is the
// subnormal 2^-127, bits 0x00400000), NaN 0x7FC00000 for e = 255.
__device__ __forceinline__ float e8m0_to_f32(unsigned e) {
    return __uint_as_float(e == 0 ? 0x00400000u : e == 255u ? 0x7FC00000u : e << 23);
}

// Dequantization of GGML q8_0 and q4_k blocks to f32 (block layouts of kernels/src/quant.rs:
// BlockQ8_0 is a little-endian f16 `d` then 32 i8 quants, 34 bytes; BlockQ4K is f16 `d`, f16
// `dmin`, 12 bytes of packed 6-bit scales / mins, then 128 bytes of nibbles, 144 bytes).
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = ceil(n_blocks * values_per_block / 256) (grid-stride
// loops, so fewer blocks also work); one thread per output value. Rows of a [n, k] matrix are
// consecutive blocks, so dequantizing rows a..b is n_blocks = (b - a) * k / block_size from
// the block of row a. Requirements the host checks: `w` 2-byte aligned (q8_0) or 4-byte aligned
// (q4_k).
// Bit-exact with `moe_kernels::row_to_f32` (dequantize_row_q8_0 / dequantize_row_q4_k): the same
// products in the same order, each rounded once (`d * q`; `(d * sc) * q - dmin * m`, unfused).

#define QK8_0 32
#define Q8_0_BYTES 34
#define QK_K 256
#define Q4_K_BYTES 144

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

// Twin: `moe_kernels::quant::dequantize_row_q8_0` (`row_to_f32` on `Weights::Q8_0`):
// out[32b + i] = d_b * qs_b[i].
extern "C" __global__ void __launch_bounds__(256)
dequant_q8_0(const unsigned char* __restrict__ w, unsigned long long n_blocks,
             float* __restrict__ out) {
    unsigned long long n = n_blocks * QK8_0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned char* blk = w + (i / QK8_0) * Q8_0_BYTES;
        float d = f16_to_f32(__ldg((const unsigned short*)blk));
        signed char q = (signed char)__ldg(blk + 2 + i % QK8_0);
        out[i] = __fmul_rn(d, (float)q);
    }
}

// Twin: `moe_kernels::quant::dequantize_row_q4_k` (`row_to_f32` on `Weights::Q4K`): in block b,
// value 64j + l (l < 32) is (d * sc_{2j}) * (qs[32j + l] & 15) - dmin * m_{2j} and value
// 64j + 32 + l is (d * sc_{2j+1}) * (qs[32j + l] >> 4) - dmin * m_{2j+1}.
extern "C" __global__ void __launch_bounds__(256)
dequant_q4_k(const unsigned char* __restrict__ w, unsigned long long n_blocks,
             float* __restrict__ out) {
    unsigned long long n = n_blocks * QK_K;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned char* blk = w + (i / QK_K) * Q4_K_BYTES;
        unsigned v = (unsigned)(i % QK_K);
        unsigned j = v / 64, hi = (v / 32) & 1, l = v % 32;
        unsigned s = 2 * j + hi;
        const unsigned char* q = blk + 4;
        unsigned sc, m;
        if (s < 4) {
            sc = __ldg(q + s) & 63;
            m = __ldg(q + s + 4) & 63;
        } else {
            sc = (__ldg(q + s + 4) & 0x0F) | ((__ldg(q + s - 4) >> 6) << 4);
            m = (__ldg(q + s + 4) >> 4) | ((__ldg(q + s) >> 6) << 4);
        }
        unsigned dd = __ldg((const unsigned*)blk);
        float d1 = __fmul_rn(f16_to_f32((unsigned short)(dd & 0xffffu)), (float)sc);
        float m1 = __fmul_rn(f16_to_f32((unsigned short)(dd >> 16)), (float)m);
        unsigned byte = __ldg(blk + 16 + 32 * j + l);
        unsigned qv = hi ? byte >> 4 : byte & 15;
        out[i] = __fsub_rn(__fmul_rn(d1, (float)qv), m1);
    }
}

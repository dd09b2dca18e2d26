// Dequantization of GGML q8_0 and q4_k blocks and of the pre-quantized FP8 / NF4 / FP4 blocks
// to f32 (block layouts of kernels/src/quant.rs: BlockQ8_0 is a little-endian f16 `d` then 32
// i8 quants, 34 bytes; BlockQ4K is f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales / mins,
// then 128 bytes of nibbles, 144 bytes; and of kernels/src/prequant.rs: BlockF8 is an f32 `d`
// then 128 E4M3 codes, 132 bytes; BlockNf4 / BlockFp4 are an f32 `d` then 32 bytes of 4-bit
// codes, high nibble first, 36 bytes; BlockMxfp4 is an E8M0 scale byte then 16 bytes of E2M1
// codes, low nibble first, 17 bytes).
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = ceil(n_blocks * values_per_block / 256) (grid-stride
// loops, so fewer blocks also work); one thread per output value. Rows of a [n, k] matrix are
// consecutive blocks, so dequantizing rows a..b is n_blocks = (b - a) * k / block_size from
// the block of row a. Requirements the host checks: `w` 2-byte aligned (q8_0) or 4-byte aligned
// (q4_k, FP8, NF4, FP4); MXFP4 reads bytes only (17-byte blocks), any alignment.
// Bit-exact with `moe_kernels::row_to_f32` (dequantize_row_q8_0 / dequantize_row_q4_k): the same
// products in the same order, each rounded once (`d * q`; `(d * sc) * q - dmin * m`, unfused;
// `d * TABLE[code]` for FP8 / NF4 / FP4, with a NaN code giving the table's NaN bits, as the
// CPU's multiply does for a finite `d`; the GPU's multiply would give its canonical NaN).

#define QK8_0 32
#define Q8_0_BYTES 34
#define QK_K 256
#define Q4_K_BYTES 144
#define QK_F8 128
#define F8_BYTES 132
#define QK_B4 64
#define B4_BYTES 36
#define QK_MX 32
#define MX_BYTES 17

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

// d * t, rounded once; a NaN t (an FP8 NaN code) passes through with its own bits, as the CPU's
// multiply returns its NaN operand for a finite d.
__device__ __forceinline__ float scale_code(float d, float t) {
    return t != t ? t : __fmul_rn(d, t);
}

// Twin: `moe_kernels::prequant::dequantize_row_f8` (`row_to_f32` on `Weights::F8`):
// out[128b + i] = d_b * E4M3_TO_F32[qs_b[i]].
extern "C" __global__ void __launch_bounds__(256)
dequant_f8(const unsigned char* __restrict__ w, unsigned long long n_blocks,
           float* __restrict__ out) {
    unsigned long long n = n_blocks * QK_F8;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned char* blk = w + (i / QK_F8) * F8_BYTES;
        float d = __ldg((const float*)blk);
        out[i] = scale_code(d, e4m3_to_f32(__ldg(blk + 4 + i % QK_F8)));
    }
}

// The 4-bit body: value 2j of a block is d * table[qs[j] >> 4], value 2j + 1 is
// d * table[qs[j] & 15]. The table is copied to shared memory first (16 banks: the lanes'
// lookups never conflict, where constant memory would serialize distinct addresses).
__device__ __forceinline__ void dequant_b4(const unsigned char* __restrict__ w,
                                           unsigned long long n_blocks, float* __restrict__ out,
                                           const unsigned* bits, unsigned round = 0) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = __uint_as_float(bits[threadIdx.x]);
    __syncthreads();
    unsigned long long n = n_blocks * QK_B4;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned char* blk = w + (i / QK_B4) * B4_BYTES;
        unsigned v = (unsigned)(i % QK_B4);
        unsigned byte = __ldg(blk + 4 + v / 2);
        unsigned code = (v & 1) ? byte & 15 : byte >> 4;
        out[i] = round_to(scale_code(__ldg((const float*)blk), table[code]), round);
    }
}

// Twin: `moe_kernels::prequant::dequantize_row_nf4` (`row_to_f32` on `Weights::Nf4`).
extern "C" __global__ void __launch_bounds__(256)
dequant_nf4(const unsigned char* __restrict__ w, unsigned long long n_blocks,
            float* __restrict__ out) {
    dequant_b4(w, n_blocks, out, NF4_BITS);
}

// Twin: `moe_kernels::prequant::dequantize_row_fp4` (`row_to_f32` on `Weights::Fp4`).
extern "C" __global__ void __launch_bounds__(256)
dequant_fp4(const unsigned char* __restrict__ w, unsigned long long n_blocks,
            float* __restrict__ out) {
    dequant_b4(w, n_blocks, out, FP4_BITS);
}

// Twins: `moe_kernels::prequant::dequantize_row_rounded4` (`row_to_f32` on `Weights::Rounded4`):
// NF4 / FP4 blocks whose values are rounded to bf16 or f16 after the multiply.
extern "C" __global__ void __launch_bounds__(256)
dequant_nf4bf16(const unsigned char* __restrict__ w, unsigned long long n_blocks,
                float* __restrict__ out) {
    dequant_b4(w, n_blocks, out, NF4_BITS, 1);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_nf4f16(const unsigned char* __restrict__ w, unsigned long long n_blocks,
               float* __restrict__ out) {
    dequant_b4(w, n_blocks, out, NF4_BITS, 2);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_fp4bf16(const unsigned char* __restrict__ w, unsigned long long n_blocks,
                float* __restrict__ out) {
    dequant_b4(w, n_blocks, out, FP4_BITS, 1);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_fp4f16(const unsigned char* __restrict__ w, unsigned long long n_blocks,
               float* __restrict__ out) {
    dequant_b4(w, n_blocks, out, FP4_BITS, 2);
}

// Twin: `moe_kernels::prequant::dequantize_row_mxfp4` (`row_to_f32` on `Weights::Mxfp4`):
// out[32b + 2j] = s_b * MXFP4_TABLE[qs_b[j] & 15], out[32b + 2j + 1] = s_b * MXFP4_TABLE[qs_b[j]
// >> 4], s_b = e8m0_to_f32(e_b): exact (a power of two times a 2-bit significand) unless it
// overflows; one multiply, as on the CPU (a NaN scale gives the canonical NaN, as the CPU's
// multiply gives its NaN operand 0x7FC00000).
extern "C" __global__ void __launch_bounds__(256)
dequant_mxfp4(const unsigned char* __restrict__ w, unsigned long long n_blocks,
              float* __restrict__ out) {
    unsigned long long n = n_blocks * QK_MX;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned char* blk = w + (i / QK_MX) * MX_BYTES;
        unsigned v = (unsigned)(i % QK_MX);
        unsigned byte = __ldg(blk + 1 + v / 2);
        unsigned code = (v & 1) ? byte >> 4 : byte & 15;
        out[i] = __fmul_rn(e8m0_to_f32(__ldg(blk)), e2m1_to_f32(code));
    }
}

// bf16 and f16 widened to f32 (the "blocks" are single values), exactly: bf16 bits << 16;
// f16 through cvt.f32.f16. For the prefill GEMM, which multiplies f32 tiles.
// Launch: as the other dequantizers (grid-stride over n values). Requirements the host checks:
// `w` 2-byte aligned.
// Twin: `moe_kernels::row_to_f32` on `Weights::Bf16` (`convert_to_f32_slice`).
extern "C" __global__ void __launch_bounds__(256)
dequant_bf16(const unsigned short* __restrict__ w, unsigned long long n,
             float* __restrict__ out) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = __uint_as_float((unsigned)__ldg(w + i) << 16);
}

// Twin: `moe_kernels::row_to_f32` on `Weights::F16` (`convert_to_f32_slice`).
extern "C" __global__ void __launch_bounds__(256)
dequant_f16(const unsigned short* __restrict__ w, unsigned long long n,
            float* __restrict__ out) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = f16_to_f32(__ldg(w + i));
}

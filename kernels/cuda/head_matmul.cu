// Per-head products with row blocks of one weight, transposed (MLA's absorbed kv_b_proj: the
// query's nope part taken into the latent space): head h of every activation row multiplies
// its own block of `len` weight rows, rows h * stride + offset .. + len of a [.., cols] weight
// W, as out[r, h, c] = sum_o x[r, h, o] * W[block_h + o, c] (x [rows, heads * len], out [rows,
// heads * cols]). (The other direction, out[r, h, o] = sum_c x[r, h, c] * W[block_h + o, c], is
// an ordinary product per head: the backend runs it as the grouped decode matvec of
// matvec.cu.)
// W in f32, bf16, f16, FP8 E4M3 x 128 (BlockF8: an f32 `d` then 128 codes, 132 bytes) or GGML
// q8_0 (BlockQ8_0: an f16 `d` then 32 i8 quants, 34 bytes), widened exactly as the CPU twins
// do (bf16: bits << 16; f16: cvt.f32.f16; FP8: d * E4M3 value, a NaN code keeping its bits;
// q8_0: d * q). Other weight types are dequantized to f32 first (dequant.cu), then
// head_matmul_t_f32 runs over that scratch.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// One launch covers heads h0 .. h0 + gridDim.y of a [rows, heads, ..] layout; `w` points at the
// first row of head h0's stride (so head h0 + y uses rows y * stride + offset .. of w).
// Launch: block = 256 threads, grid = (ceil(cols / 256), heads in the launch, ceil(rows / 8));
// thread c = 256 bx + t computes column c of head h0 + y for rows 8z .. 8z + 7, the lanes of a
// warp reading consecutive weight values (each weight value read once for those rows).
// Requirements the host checks: every weight row of every block inside W; cols a multiple of
// 128 (FP8) or 32 (q8_0) and W 4-byte (FP8) or 2-byte (q8_0) aligned; heads in the launch and
// ceil(rows / 8) at most 65 535.
// Order: the sum runs over o in ascending order, each product and add rounded once (no FMA):
// the CPU twin's order and roundings, so the result is its own bit for bit.

// Activation rows per block: each weight value is read once for up to 8 rows (the matvec's
// MV_MAX_ROWS), 8 accumulators per thread within the register budget.
#define HM_ROWS 8
#define HM_F8_VALUES 128
#define HM_F8_BYTES 132
#define HM_Q8_VALUES 32
#define HM_Q8_BYTES 34

enum HmType { HM_F32, HM_BF16, HM_F16, HM_F8, HM_Q8_0 };

// Element i of a row-major weight whose rows are whole blocks (so blocks count on across rows).
template <HmType T>
__device__ __forceinline__ float hm_load(const void* __restrict__ w, size_t i) {
    if constexpr (T == HM_F32) return __ldg((const float*)w + i);
    if constexpr (T == HM_BF16)
        return __uint_as_float((unsigned)__ldg((const unsigned short*)w + i) << 16);
    if constexpr (T == HM_F16) return f16_to_f32(__ldg((const unsigned short*)w + i));
    if constexpr (T == HM_F8) {
        const unsigned char* blk = (const unsigned char*)w + (i / HM_F8_VALUES) * HM_F8_BYTES;
        float d = __ldg((const float*)blk);
        float t = e4m3_to_f32(__ldg(blk + 4 + i % HM_F8_VALUES));
        return t != t ? t : __fmul_rn(d, t);
    }
    if constexpr (T == HM_Q8_0) {
        const unsigned char* blk = (const unsigned char*)w + (i / HM_Q8_VALUES) * HM_Q8_BYTES;
        float d = f16_to_f32(__ldg((const unsigned short*)blk));
        return __fmul_rn(d, (float)(signed char)__ldg(blk + 2 + i % HM_Q8_VALUES));
    }
    return 0.0f;
}

template <HmType T>
__device__ __forceinline__ void head_cols(const float* __restrict__ x, const void* __restrict__ w,
                                          float* __restrict__ out, unsigned rows, unsigned heads,
                                          unsigned h0, unsigned stride, unsigned offset,
                                          unsigned len, unsigned cols) {
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned h = h0 + blockIdx.y, r0 = blockIdx.z * HM_ROWS;
    if (c >= cols || r0 >= rows) return;
    unsigned m = rows - r0 < HM_ROWS ? rows - r0 : HM_ROWS;
    size_t base = ((size_t)blockIdx.y * stride + offset) * cols + c;
    const float* xh = x + ((size_t)r0 * heads + h) * len;
    size_t xr = (size_t)heads * len;
    float acc[HM_ROWS];
#pragma unroll
    for (int r = 0; r < HM_ROWS; r++) acc[r] = 0.0f;
#pragma unroll 4
    for (unsigned o = 0; o < len; o++) {
        float wv = hm_load<T>(w, base + (size_t)o * cols);
#pragma unroll
        for (int r = 0; r < HM_ROWS; r++)
            if (r < m) acc[r] = __fadd_rn(acc[r], __fmul_rn(__ldg(xh + r * xr + o), wv));
    }
#pragma unroll
    for (int r = 0; r < HM_ROWS; r++)
        if (r < m) out[((size_t)(r0 + r) * heads + h) * cols + c] = acc[r];
}

// Twin (every entry point below): `moe_runtime::backend::cpu::head_matmul_rows`, transposed,
// with rows widened by `moe_kernels::row_to_f32`, over heads h0 .. h0 + gridDim.y.
extern "C" __global__ void __launch_bounds__(256)
head_matmul_t_f32(const float* __restrict__ x, const float* __restrict__ w,
                  float* __restrict__ out, unsigned rows, unsigned heads, unsigned h0,
                  unsigned stride, unsigned offset, unsigned len, unsigned cols) {
    head_cols<HM_F32>(x, w, out, rows, heads, h0, stride, offset, len, cols);
}

extern "C" __global__ void __launch_bounds__(256)
head_matmul_t_bf16(const float* __restrict__ x, const unsigned short* __restrict__ w,
                   float* __restrict__ out, unsigned rows, unsigned heads, unsigned h0,
                   unsigned stride, unsigned offset, unsigned len, unsigned cols) {
    head_cols<HM_BF16>(x, w, out, rows, heads, h0, stride, offset, len, cols);
}

extern "C" __global__ void __launch_bounds__(256)
head_matmul_t_f16(const float* __restrict__ x, const unsigned short* __restrict__ w,
                  float* __restrict__ out, unsigned rows, unsigned heads, unsigned h0,
                  unsigned stride, unsigned offset, unsigned len, unsigned cols) {
    head_cols<HM_F16>(x, w, out, rows, heads, h0, stride, offset, len, cols);
}

extern "C" __global__ void __launch_bounds__(256)
head_matmul_t_f8(const float* __restrict__ x, const unsigned char* __restrict__ w,
                 float* __restrict__ out, unsigned rows, unsigned heads, unsigned h0,
                 unsigned stride, unsigned offset, unsigned len, unsigned cols) {
    head_cols<HM_F8>(x, w, out, rows, heads, h0, stride, offset, len, cols);
}

extern "C" __global__ void __launch_bounds__(256)
head_matmul_t_q8_0(const float* __restrict__ x, const unsigned char* __restrict__ w,
                   float* __restrict__ out, unsigned rows, unsigned heads, unsigned h0,
                   unsigned stride, unsigned offset, unsigned len, unsigned cols) {
    head_cols<HM_Q8_0>(x, w, out, rows, heads, h0, stride, offset, len, cols);
}

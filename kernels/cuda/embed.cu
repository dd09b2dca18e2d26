// Embedding gather: token rows of a [vocab, width] table, widened to f32.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = (n_ids, ceil(width / 256)) (tokens on x, which has no
// 65 535 limit). Ids at or above `vocab` give a row of zeros (the host checks ids before
// launching; a kernel cannot report an error).
// Widening is exact (bf16: bits << 16; f16: cvt.f32.f16), so the rows equal the CPU twin's bit
// for bit.

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float((unsigned)b << 16);
}

// Twin: `moe_kernels::row_to_f32` on `Weights::F32` (the CPU backend's `embed`).
extern "C" __global__ void __launch_bounds__(256)
embed_f32(const float* __restrict__ table, const unsigned* __restrict__ ids, unsigned n_ids,
          unsigned vocab, unsigned width, float* __restrict__ out) {
    unsigned t = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= n_ids || c >= width) return;
    unsigned id = ids[t];
    out[(size_t)t * width + c] = id < vocab ? table[(size_t)id * width + c] : 0.0f;
}

// Twin: `moe_kernels::row_to_f32` on `Weights::Bf16`.
extern "C" __global__ void __launch_bounds__(256)
embed_bf16(const unsigned short* __restrict__ table, const unsigned* __restrict__ ids,
           unsigned n_ids, unsigned vocab, unsigned width, float* __restrict__ out) {
    unsigned t = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= n_ids || c >= width) return;
    unsigned id = ids[t];
    out[(size_t)t * width + c] = id < vocab ? bf16_to_f32(table[(size_t)id * width + c]) : 0.0f;
}

// Twin: `moe_kernels::row_to_f32` on `Weights::F16`.
extern "C" __global__ void __launch_bounds__(256)
embed_f16(const unsigned short* __restrict__ table, const unsigned* __restrict__ ids,
          unsigned n_ids, unsigned vocab, unsigned width, float* __restrict__ out) {
    unsigned t = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= n_ids || c >= width) return;
    unsigned id = ids[t];
    out[(size_t)t * width + c] = id < vocab ? f16_to_f32(table[(size_t)id * width + c]) : 0.0f;
}

// RMSNorm of [rows, width] f32 rows, in place, with an f32 weight.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: grid = rows, block = 256 threads (any multiple of 32 up to 1024 works; the reduction
// order, and so the result, is fixed by the block size, and the host always uses 256).
// Deterministic: thread t sums x[t], x[t + 256], ... in order, then a fixed xor-shuffle tree per
// warp and the warp sums in ascending warp order; no atomics. Not bit-identical to the CPU twin
// (its sum runs left to right); the scale and the products are (IEEE division and square root,
// no contraction).

// Twin: `rms_norm_rows` in runtime/src/backend/cpu/mod.rs:
// `x = w * (x * (1 / sqrt(sum(x^2) / width + eps)))`.
extern "C" __global__ void __launch_bounds__(256)
rms_norm_f32(float* __restrict__ x, const float* __restrict__ w, unsigned rows, unsigned width,
             float eps) {
    __shared__ float warp_sums[32];
    __shared__ float scale;
    unsigned row = blockIdx.x;
    if (row >= rows) return;
    float* xr = x + (size_t)row * width;
    float ss = 0.0f;
    for (unsigned i = threadIdx.x; i < width; i += blockDim.x) ss = __fmaf_rn(xr[i], xr[i], ss);
    ss = warp_sum(ss);
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (unsigned i = 0; i < warps; i++) total += warp_sums[i];
        float mean = __fdiv_rn(total, (float)width);
        scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    }
    __syncthreads();
    float r = scale;
    for (unsigned i = threadIdx.x; i < width; i += blockDim.x)
        xr[i] = __fmul_rn(w[i], __fmul_rn(xr[i], r));
}

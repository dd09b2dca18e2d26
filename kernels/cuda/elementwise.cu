// Elementwise f32 operations on activations: residual add, the gated linear units, sigmoid
// gates.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = ceil(n / 256) (grid-stride loops, so fewer blocks also
// work); add_gated_rows_f32 takes grid = (rows, ceil(width / 256)) (rows on x, which has no
// 65 535 limit).
// Every operation is written with explicit round-to-nearest intrinsics, so nothing is
// contracted into an FMA and the order is the CPU twin's: add, the clamps and the products are
// bit-identical to it; expf (full precision, no fast-math) may differ from the CPU's exp in the
// last ulp.

__device__ __forceinline__ float sigmoid(float x) {
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
}

// Twin: the CPU backend's `add` (runtime/src/backend/cpu/mod.rs): x[i] += y[i].
extern "C" __global__ void __launch_bounds__(256)
add_f32(float* __restrict__ x, const float* __restrict__ y, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]);
}

// Twin: `silu_mul` in runtime/src/backend/cpu/mod.rs: u[i] *= g[i] / (1 + exp(-g[i])).
extern "C" __global__ void __launch_bounds__(256)
silu_mul_f32(const float* __restrict__ g, float* __restrict__ u, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gv = g[i];
        u[i] = __fmul_rn(u[i], __fdiv_rn(gv, __fadd_rn(1.0f, expf(-gv))));
    }
}

// Twin: `glu` with `Glu::ClampedSwiGlu { limit, alpha }` in runtime/src/backend/cpu/mod.rs:
// g = min(g, limit); up = clamp(u, -limit, limit); u = (up + 1) * g * sigmoid(alpha * g).
// NaN handling is Rust's: min ignores a NaN g, clamp keeps a NaN u.
extern "C" __global__ void __launch_bounds__(256)
glu_clamped_f32(const float* __restrict__ g, float* __restrict__ u, unsigned n, float limit,
                float alpha) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gv = fminf(g[i], limit);
        float up = u[i];
        if (up < -limit) up = -limit;
        if (up > limit) up = limit;
        float s = sigmoid(__fmul_rn(alpha, gv));
        u[i] = __fmul_rn(__fmul_rn(__fadd_rn(up, 1.0f), gv), s);
    }
}

// Twin: the CPU backend's `mul_sigmoid`: x[i] *= sigmoid(gate[i]).
extern "C" __global__ void __launch_bounds__(256)
mul_sigmoid_f32(float* __restrict__ x, const float* __restrict__ gate, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], sigmoid(gate[i]));
}

// Twin: the CPU backend's `add_gated_rows`: out[r, c] += sigmoid(gate[r]) * y[r, c] for
// out and y of shape [rows, width] and one gate value per row.
extern "C" __global__ void __launch_bounds__(256)
add_gated_rows_f32(float* __restrict__ out, const float* __restrict__ y,
                   const float* __restrict__ gate, unsigned rows, unsigned width) {
    unsigned r = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= width) return;
    float s = sigmoid(gate[r]);
    size_t i = (size_t)r * width + c;
    out[i] = __fadd_rn(out[i], __fmul_rn(s, y[i]));
}

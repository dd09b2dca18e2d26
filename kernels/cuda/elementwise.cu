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

// Twin: the bias loop of the CPU backend's `matmul` (runtime/src/backend/cpu/mod.rs:
// `*o += b` over each row of the output): x[r, c] += b[c] for x of shape [rows, width] and one
// bias row b of `width` values.
// Launch: grid = (rows, ceil(width / 256)) (rows on x, which has no 65 535 limit); the host
// checks that x holds rows * width values and b holds width.
extern "C" __global__ void __launch_bounds__(256)
add_rows_f32(float* __restrict__ x, const float* __restrict__ b, unsigned rows, unsigned width) {
    unsigned r = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= width) return;
    size_t i = (size_t)r * width + c;
    x[i] = __fadd_rn(x[i], b[c]);
}

// Twin: the CPU backend's `clamp`: x[i] = x[i].clamp(-limit, limit), as Rust's f32::clamp
// computes it (a NaN stays NaN, -0.0 stays -0.0 inside the range).
// Launch: grid-stride, grid = ceil(n / 256) or fewer blocks; the host checks that limit is a
// number >= 0 (Rust's clamp panics otherwise, so the twin never sees another limit).
extern "C" __global__ void __launch_bounds__(256)
clamp_f32(float* __restrict__ x, unsigned n, float limit) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        x[i] = v < -limit ? -limit : (v > limit ? limit : v);
    }
}

// Twin: the CPU backend's `split_halves`: x holds `blocks` blocks of 2 * d values; the first d
// of block i go to a[i * d ..], the last d to b[i * d ..]. A copy, bit for bit.
// Launch: grid = (blocks, ceil(d / 256)) (blocks on x, which has no 65 535 limit); the host
// checks d > 0, that x holds blocks * 2 * d values and a and b hold blocks * d each.
extern "C" __global__ void __launch_bounds__(256)
split_halves_f32(const float* __restrict__ x, float* __restrict__ a, float* __restrict__ b,
                 unsigned blocks, unsigned d) {
    unsigned i = blockIdx.x;
    unsigned j = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= blocks || j >= d) return;
    size_t src = (size_t)i * 2 * d + j;
    size_t dst = (size_t)i * d + j;
    a[dst] = x[src];
    b[dst] = x[src + d];
}

// Twin: the CPU backend's `split_heads`: x holds `blocks` blocks of a + b values; the first a
// of block i go to x_a[i * a ..], the last b to x_b[i * b ..] (MLA's nope / rope parts of a
// head). A copy, bit for bit.
// Launch: grid = (blocks, ceil((a + b) / 256)) (blocks on x, which has no 65 535 limit); the
// host checks a + b > 0, that x holds blocks * (a + b) values, x_a blocks * a and x_b blocks * b.
extern "C" __global__ void __launch_bounds__(256)
split_heads_f32(const float* __restrict__ x, float* __restrict__ x_a, float* __restrict__ x_b,
                unsigned blocks, unsigned a, unsigned b) {
    unsigned i = blockIdx.x;
    unsigned j = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= blocks || j >= a + b) return;
    float v = x[(size_t)i * (a + b) + j];
    if (j < a)
        x_a[(size_t)i * a + j] = v;
    else
        x_b[(size_t)i * b + (j - a)] = v;
}

// Twin: the CPU backend's `join_heads`, the inverse of split_heads_f32: block i of out (a + b
// values) is x_a[i * a .. + a] then x_b[i * b .. + b]. A copy, bit for bit.
// Launch: grid = (blocks, ceil((a + b) / 256)); the host checks a + b > 0, that x_a holds
// blocks * a values, x_b blocks * b and out blocks * (a + b).
extern "C" __global__ void __launch_bounds__(256)
join_heads_f32(const float* __restrict__ x_a, const float* __restrict__ x_b,
               float* __restrict__ out, unsigned blocks, unsigned a, unsigned b) {
    unsigned i = blockIdx.x;
    unsigned j = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= blocks || j >= a + b) return;
    out[(size_t)i * (a + b) + j] =
        j < a ? x_a[(size_t)i * a + j] : x_b[(size_t)i * b + (j - a)];
}

// Twin: the even / odd split of `moe_runtime::store::expert_ffn_rows` for an interleaved
// gate_up (gpt-oss): x holds `blocks` blocks of 2 * d values; value 2j of block i goes to
// a[i * d + j], value 2j + 1 to b[i * d + j]. A copy, bit for bit.
// Launch: grid = (blocks, ceil(d / 256)); the host checks d > 0, that x holds blocks * 2 * d
// values and a and b hold blocks * d each.
extern "C" __global__ void __launch_bounds__(256)
split_pairs_f32(const float* __restrict__ x, float* __restrict__ a, float* __restrict__ b,
                unsigned blocks, unsigned d) {
    unsigned i = blockIdx.x;
    unsigned j = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= blocks || j >= d) return;
    size_t src = (size_t)i * 2 * d + 2 * (size_t)j;
    size_t dst = (size_t)i * d + j;
    a[dst] = x[src];
    b[dst] = x[src + 1];
}

// Row gather: out[i] = x[rows[i]] for n rows of `width` values (the token rows routed to one
// expert, gathered before its matmuls). Plain copies, so bit-exact with the twin.
// Launch: block = 256 threads, grid = (n, ceil(width / 256)) (rows on x, which has no 65 535
// limit). Requirements the host checks: every rows[i] below the row count of x.
// Twin: the row gather of `moe_runtime::store::expert_ffn_rows`.
extern "C" __global__ void __launch_bounds__(256)
gather_rows_f32(const float* __restrict__ x, const unsigned* __restrict__ rows, unsigned n,
                unsigned width, float* __restrict__ out) {
    unsigned i = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= n || c >= width) return;
    out[(size_t)i * width + c] = x[(size_t)__ldg(rows + i) * width + c];
}

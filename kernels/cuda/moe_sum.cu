// Deterministic sum of expert outputs: out[rows[i]] += w[i] * y[i] for the routed rows of one
// expert, launched once per expert in ascending expert order on one stream, so every output
// element receives its expert terms in that order, one rounded multiply and one rounded add
// each (no atomics): the result is bit-exact with the CPU twin.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = (ceil(hidden / 256), min(n, 65535)) (grid-stride loops on
// both axes, so smaller grids also work); thread (x, i) updates column x of routed row i.
// Requirements the host checks: the entries of `rows` are distinct (an expert is chosen at most
// once per token row, so its routed rows are) and below the row count of `out`; `y` is
// `[n, hidden]`, `w` is `[n]`.

// Twin: `moe_runtime::store::add_weighted_rows` (`*o += y * w`).
extern "C" __global__ void __launch_bounds__(256)
moe_sum_f32(float* __restrict__ out, const unsigned* __restrict__ rows,
            const float* __restrict__ w, const float* __restrict__ y, unsigned n,
            unsigned hidden) {
    for (unsigned i = blockIdx.y; i < n; i += gridDim.y) {
        float wi = __ldg(w + i);
        float* o = out + (size_t)__ldg(rows + i) * hidden;
        const float* yi = y + (size_t)i * hidden;
        for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < hidden;
             c += gridDim.x * blockDim.x) {
            o[c] = __fadd_rn(o[c], __fmul_rn(__ldg(yi + c), wi));
        }
    }
}

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

// The whole layer's expert sum in one launch: out[r, c] += w[i] * y[i, c] for the entries i of
// token row r, taken in the order listed (`entries[start[r] .. start[r + 1]]`, which the host
// lists in ascending expert order), one rounded multiply and one rounded add each: the same
// sequence of operations per output element as one `moe_sum_f32` launch per expert, so the
// result is bit-exact with the twin.
// Launch: block = 256 threads, grid = (rows, ceil(hidden / 256)) (rows on x). Requirements the
// host checks: `start` has rows + 1 nondecreasing entries, every listed i below the rows of y.
// Twin: `moe_runtime::store::add_weighted_rows`, expert after expert.
extern "C" __global__ void __launch_bounds__(256)
moe_sum_rows_f32(float* __restrict__ out, const unsigned* __restrict__ start,
                 const unsigned* __restrict__ entries, const float* __restrict__ w,
                 const float* __restrict__ y, unsigned rows, unsigned hidden) {
    unsigned r = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= hidden) return;
    float o = out[(size_t)r * hidden + c];
    for (unsigned j = __ldg(start + r); j < __ldg(start + r + 1); j++) {
        unsigned i = __ldg(entries + j);
        o = __fadd_rn(o, __fmul_rn(__ldg(y + (size_t)i * hidden + c), __ldg(w + i)));
    }
    out[(size_t)r * hidden + c] = o;
}

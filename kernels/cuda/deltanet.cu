// Gated DeltaNet over the new tokens of one sequence (one for a decode step, a prefill chunk
// otherwise): the input split, the causal depthwise conv1d with SiLU and its rolling state, the
// q/k normalisation, the recurrent gated delta rule per value head with its [dk, dv] state, and
// the output gate.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// In the convolution and the delta rule every thread owns one state column (a conv channel; a
// (value head, value dim) pair) and walks the tokens in order, so no two threads touch the same
// state element and no barrier is needed.
// Arithmetic: the twins' operations in the twins' order, each rounded once (unfused multiply
// and add, IEEE division): results are bit-exact with the twins wherever `expf` agrees with the
// CPU's `exp` (CUDA's expf is within 2 ulp, so the GPU result is within a few ulp per step).

#define CONV_MAX_KERNEL 8

// One token of the gated delta rule for one state column: `s` is the column (dk values, dv
// apart) of a value head's [dk, dv] state, q and k the token's key-head vectors, v its value
// for this column: S *= exp(g); delta = beta * (v - Sᵀ k), k in ascending order; S += k delta,
// stored; returns o = Sᵀ q from the updated state. Each operation rounded once, in the twin's
// order.
__device__ __forceinline__ float delta_token(float* __restrict__ s, const float* __restrict__ q,
                                             const float* __restrict__ k, float v, unsigned dk,
                                             unsigned dv, float g, float beta) {
    float decay = expf(g);
    float delta = v;
#pragma unroll 4
    for (unsigned i = 0; i < dk; i++)
        delta = __fsub_rn(delta, __fmul_rn(__fmul_rn(s[(size_t)i * dv], decay), __ldg(k + i)));
    delta = __fmul_rn(delta, beta);
    float o = 0.0f;
#pragma unroll 4
    for (unsigned i = 0; i < dk; i++) {
        float x = __fadd_rn(__fmul_rn(s[(size_t)i * dv], decay), __fmul_rn(__ldg(k + i), delta));
        s[(size_t)i * dv] = x;
        o = __fadd_rn(o, __fmul_rn(x, __ldg(q + i)));
    }
    return o;
}

// The gated DeltaNet's input split: each token row's interleaved projections, per key head h
// `[q (dk) | k (dk) | v (group dv) | z (group dv)]` (`qkvz`, [rows, nk * (2 dk + 2 group dv)])
// and `[b (group) | a (group)]` (`ba`, [rows, 2 nv]), into the convolution's channel order
// `mixed` ([rows, conv_dim]: all q heads, all k heads, all v heads), the output gate `z`
// ([rows, nv dv]) and per value head beta = sigmoid(b) and g = neg_a * softplus(a + dt_bias)
// ([rows, nv]), softplus linear above 20 as torch's is; group = nv / nk.
// Launch: block = 256 threads, grid = (rows, ceil(nk * (2 dk + 2 group dv) / 256)); thread e of
// row r moves element e of the qkvz row, and threads e < nv of the first column block also
// compute beta and g of value head e. The host checks nv a multiple of nk.
// Copies are exact; beta and g use expf / logf (within a few ulp of the CPU twin).
// Twin: `moe_runtime::backend::cpu::deltanet::split_inputs`.
extern "C" __global__ void __launch_bounds__(256)
deltanet_split_f32(const float* __restrict__ qkvz, const float* __restrict__ ba,
                   const float* __restrict__ neg_a, const float* __restrict__ dt_bias,
                   unsigned rows, unsigned nk, unsigned nv, unsigned dk, unsigned dv,
                   float* __restrict__ mixed, float* __restrict__ z, float* __restrict__ beta,
                   float* __restrict__ g) {
    unsigned r = blockIdx.x;
    unsigned e = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    unsigned group = nv / nk, per_k = 2 * dk + 2 * group * dv;
    unsigned key_dim = nk * dk, conv_dim = 2 * key_dim + nv * dv;
    if (e < nk * per_k) {
        unsigned h = e / per_k, s = e % per_k;
        float v = __ldg(qkvz + (size_t)r * nk * per_k + e);
        if (s < dk)
            mixed[(size_t)r * conv_dim + h * dk + s] = v;
        else if (s < 2 * dk)
            mixed[(size_t)r * conv_dim + key_dim + h * dk + (s - dk)] = v;
        else if (s < 2 * dk + group * dv)
            mixed[(size_t)r * conv_dim + 2 * key_dim + h * group * dv + (s - 2 * dk)] = v;
        else
            z[(size_t)r * nv * dv + h * group * dv + (s - 2 * dk - group * dv)] = v;
    }
    if (blockIdx.y == 0 && threadIdx.x < nv) {
        unsigned vh = threadIdx.x, h = vh / group, j = vh % group;
        const float* bar = ba + (size_t)r * 2 * nv + h * 2 * group;
        float b = __ldg(bar + j);
        beta[(size_t)r * nv + vh] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-b)));
        float x = __fadd_rn(__ldg(bar + group + j), __ldg(dt_bias + vh));
        float sp = x > 20.0f ? x : log1pf(expf(x));
        g[(size_t)r * nv + vh] = __fmul_rn(__ldg(neg_a + vh), sp);
    }
}

// q and k of every key head l2-normalised, q also scaled: per row of the convolution output
// (`x`, [rows, stride]), heads 0..nk (q) and nk..2 nk (k) of dk values at the row's start,
// v = v * f with f = 1 / sqrt(sum v^2 + 1e-6), times `scale` for q heads.
// Launch: block = 256 threads, grid = (rows, 2 nk); one block per head, dk <= 256 (the host
// checks). Deterministic: a fixed xor-shuffle tree per warp, then the warps in ascending order
// (not bit-identical to the twin, whose sum runs left to right; the scale and products are).
// Twin: `moe_runtime::backend::cpu::deltanet::normalize_qk`.
extern "C" __global__ void __launch_bounds__(256)
l2norm_heads_f32(float* __restrict__ x, unsigned rows, unsigned stride, unsigned nk,
                 unsigned dk, float scale) {
    __shared__ float warp_sums[8];
    __shared__ float factor;
    unsigned r = blockIdx.x, h = blockIdx.y, t = threadIdx.x;
    if (r >= rows || h >= 2 * nk) return;
    float* head = x + (size_t)r * stride + (size_t)h * dk;
    float v = t < dk ? head[t] : 0.0f;
    float s = warp_sum(__fmul_rn(v, v));
    if ((t & 31) == 0) warp_sums[t >> 5] = s;
    __syncthreads();
    if (t == 0) {
        float sum = 0.0f;
        for (unsigned w = 0; w < 8; w++) sum = __fadd_rn(sum, warp_sums[w]);
        float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(sum, 1e-6f)));
        factor = h < nk ? __fmul_rn(inv, scale) : inv;
    }
    __syncthreads();
    if (t < dk) head[t] = __fmul_rn(v, factor);
}

// The output gate: x = x * (z * sigmoid(z)) elementwise, in that order (the twin's).
// Launch: block = 256 threads, grid = ceil(n / 256) (grid-stride).
// Twin: `moe_runtime::backend::cpu::deltanet::mul_silu`.
extern "C" __global__ void __launch_bounds__(256)
mul_silu_f32(float* __restrict__ x, const float* __restrict__ z, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float zv = z[i];
        float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-zv)));
        x[i] = __fmul_rn(x[i], __fmul_rn(zv, s));
    }
}

// The convolution over the n new rows of one sequence, token after token per channel, the
// window carried in registers: out = acc / (1 + exp(-acc)), acc = sum_j w[ch, j] * window[j]
// (window = the state rows then the row), then the state drops its oldest row and appends it.
// Twin: `moe_runtime::backend::cpu::deltanet::causal_conv1d_silu` over n rows.
// Launch: block = 256 threads, grid = ceil(c / 256). x and out are [n, c], state [kernel - 1, c]
// (this sequence's), w [c, kernel]. The host checks 1 <= kernel <= CONV_MAX_KERNEL.
extern "C" __global__ void __launch_bounds__(256)
conv1d_silu_seq_f32(const float* __restrict__ x, const float* __restrict__ w,
                    float* __restrict__ state, unsigned n, unsigned c, unsigned kernel,
                    float* __restrict__ out) {
    unsigned ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c || kernel == 0 || kernel > CONV_MAX_KERNEL) return;
    float* st = state + ch;
    const float* taps = w + (size_t)ch * kernel;
    float win[CONV_MAX_KERNEL];
#pragma unroll
    for (unsigned j = 0; j < CONV_MAX_KERNEL; j++)
        if (j + 1 < kernel) win[j] = st[(size_t)j * c];
#pragma unroll 1
    for (unsigned t = 0; t < n; t++) {
        float xv = __ldg(x + (size_t)t * c + ch);
        float acc = 0.0f;
#pragma unroll
        for (unsigned j = 0; j < CONV_MAX_KERNEL; j++)
            if (j + 1 < kernel) acc = __fadd_rn(acc, __fmul_rn(__ldg(taps + j), win[j]));
        acc = __fadd_rn(acc, __fmul_rn(__ldg(taps + kernel - 1), xv));
        out[(size_t)t * c + ch] = __fdiv_rn(acc, __fadd_rn(1.0f, expf(-acc)));
#pragma unroll
        for (unsigned j = 0; j + 1 < CONV_MAX_KERNEL; j++)
            if (j + 2 < kernel) win[j] = win[j + 1];
        if (kernel > 1) win[kernel - 2] = xv;
    }
#pragma unroll
    for (unsigned j = 0; j < CONV_MAX_KERNEL; j++)
        if (j + 1 < kernel) st[(size_t)j * c] = win[j];
}

// The gated delta rule over the n new tokens of one sequence, token after token per state
// column (`delta_token`), the state read and written in place.
// Twin: `moe_runtime::backend::cpu::deltanet::recurrent` over n tokens (per value head).
// Launch: block = 256 threads, grid = ceil(nv * dv / 256). qkv is [n, conv_dim] (after the q/k
// normalisation), g and beta [n, nv], state [nv, dk, dv] (this sequence's), out [n, nv * dv].
// The host checks nv a multiple of nk.
extern "C" __global__ void __launch_bounds__(256)
gated_delta_seq_f32(const float* __restrict__ qkv, unsigned conv_dim,
                    const float* __restrict__ g, const float* __restrict__ beta,
                    float* __restrict__ state, unsigned n, unsigned nk, unsigned nv,
                    unsigned dk, unsigned dv, float* __restrict__ out) {
    unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= nv * dv) return;
    unsigned vh = j / dv, d = j % dv, kh = vh / (nv / nk);
    float* s = state + (size_t)vh * dk * dv + d;
#pragma unroll 1
    for (unsigned t = 0; t < n; t++) {
        const float* row = qkv + (size_t)t * conv_dim;
        const float* q = row + (size_t)kh * dk;
        const float* k = row + (size_t)nk * dk + (size_t)kh * dk;
        out[(size_t)t * nv * dv + j] =
            delta_token(s, q, k, __ldg(row + 2 * (size_t)nk * dk + (size_t)vh * dv + d), dk, dv,
                        __ldg(g + (size_t)t * nv + vh), __ldg(beta + (size_t)t * nv + vh));
    }
}

// Gated DeltaNet decode step (one new token per sequence): the causal depthwise conv1d with
// SiLU and its rolling state, and the recurrent gated delta rule for one token per value head
// with its [dk, dv] state.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// States live in slot arrays; `slot[r]` names the state of the sequence whose new row is r.
// Every thread owns one state column (a conv channel; a (value head, value dim) pair), so no
// two threads touch the same state element and no barrier is needed.
// Arithmetic: the twins' operations in the twins' order, each rounded once (unfused multiply
// and add, IEEE division): results are bit-exact with the twins wherever `expf` agrees with the
// CPU's `exp` (CUDA's expf is within 2 ulp, so the GPU result is within a few ulp per step).

#define CONV_MAX_KERNEL 8

// Twin: `moe_runtime::backend::cpu::deltanet::causal_conv1d_silu` for one new row.
// Launch: block = 256 threads, grid = (ceil(c / 256), rows). x is [rows, c], w is [c, kernel]
// (channel-major taps, oldest first), state is [slots, kernel - 1, c] (the last kernel - 1 input
// rows, oldest first), out is [rows, c]. The host checks 1 <= kernel <= CONV_MAX_KERNEL (8:
// models use 4; the window stays in registers) and distinct slots.
// out = acc / (1 + exp(-acc)), acc = sum_j w[ch, j] * window[j] (window = state rows then x);
// the state then drops its oldest row and appends x.
extern "C" __global__ void __launch_bounds__(256)
conv1d_silu_step_f32(const float* __restrict__ x, const float* __restrict__ w,
                     float* __restrict__ state, const unsigned* __restrict__ slot,
                     unsigned c, unsigned kernel, float* __restrict__ out) {
    unsigned ch = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (ch >= c || kernel == 0 || kernel > CONV_MAX_KERNEL) return;
    float* st = state + (size_t)__ldg(slot + r) * (kernel - 1) * c + ch;
    const float* taps = w + (size_t)ch * kernel;
    float win[CONV_MAX_KERNEL];
#pragma unroll
    for (unsigned j = 0; j < CONV_MAX_KERNEL; j++)
        if (j + 1 < kernel) win[j] = st[(size_t)j * c];
    float xv = __ldg(x + (size_t)r * c + ch);
    float acc = 0.0f;
#pragma unroll
    for (unsigned j = 0; j < CONV_MAX_KERNEL; j++)
        if (j + 1 < kernel) acc = __fadd_rn(acc, __fmul_rn(__ldg(taps + j), win[j]));
    acc = __fadd_rn(acc, __fmul_rn(__ldg(taps + kernel - 1), xv));
    out[(size_t)r * c + ch] = __fdiv_rn(acc, __fadd_rn(1.0f, expf(-acc)));
#pragma unroll
    for (unsigned j = 1; j < CONV_MAX_KERNEL; j++)
        if (j + 1 < kernel) st[(size_t)(j - 1) * c] = win[j];
    if (kernel > 1) st[(size_t)(kernel - 2) * c] = xv;
}

// Twin: `moe_runtime::backend::cpu::deltanet::recurrent` for one token (per value head vh of
// row r, with key head kh = vh / (nv / nk)):
//   S *= exp(g);  delta = beta * (v - Sᵀ k);  S += k deltaᵀ;  o = Sᵀ q.
// Launch: block = 256 threads, grid = (ceil(nv * dv / 256), rows); thread j of row r owns value
// column (vh, d) = (j / dv, j % dv) of that head's state. qkv is the [rows, conv_dim] output of
// the convolution after the per-head q / k normalisation (q of key head kh at kh * dk, k at
// nk * dk + kh * dk, v of value head vh at 2 * nk * dk + vh * dv), g and beta are [rows, nv],
// state is [slots, nv, dk, dv] (row-major [dk, dv] per head), out is [rows, nv * dv]. The host
// checks nv a multiple of nk, conv_dim >= 2 * nk * dk + nv * dv and distinct slots.
extern "C" __global__ void __launch_bounds__(256)
gated_delta_step_f32(const float* __restrict__ qkv, unsigned conv_dim,
                     const float* __restrict__ g, const float* __restrict__ beta,
                     float* __restrict__ state, const unsigned* __restrict__ slot, unsigned nk,
                     unsigned nv, unsigned dk, unsigned dv, float* __restrict__ out) {
    unsigned j = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (j >= nv * dv) return;
    unsigned vh = j / dv, d = j % dv, kh = vh / (nv / nk);
    const float* row = qkv + (size_t)r * conv_dim;
    const float* q = row + (size_t)kh * dk;
    const float* k = row + (size_t)nk * dk + (size_t)kh * dk;
    float* s = state + ((size_t)__ldg(slot + r) * nv + vh) * dk * dv + d;
    float decay = expf(__ldg(g + (size_t)r * nv + vh));
    // delta = beta * (v - Sᵀ k) over the decayed state, k in ascending order.
    float delta = __ldg(row + 2 * (size_t)nk * dk + (size_t)vh * dv + d);
#pragma unroll 4
    for (unsigned i = 0; i < dk; i++)
        delta = __fsub_rn(delta, __fmul_rn(__fmul_rn(s[(size_t)i * dv], decay), __ldg(k + i)));
    delta = __fmul_rn(delta, __ldg(beta + (size_t)r * nv + vh));
    // S = S * decay + k delta, stored; o = Sᵀ q from the updated state.
    float o = 0.0f;
#pragma unroll 4
    for (unsigned i = 0; i < dk; i++) {
        float v = __fadd_rn(__fmul_rn(s[(size_t)i * dv], decay), __fmul_rn(__ldg(k + i), delta));
        s[(size_t)i * dv] = v;
        o = __fadd_rn(o, __fmul_rn(v, __ldg(q + i)));
    }
    out[(size_t)r * nv * dv + j] = o;
}

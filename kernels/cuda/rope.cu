// RoPE over every head_dim-wide head of q and k rows, in place: rotate-half pairs, or the
// interleaved pairs of DeepSeek-V3's rope.
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: grid = rows, block = 256 threads. Row r of q ([rows, q_width]) and of k
// ([rows, k_width]) rotates for position positions[r]; in each head only the first rot_dim
// values rotate (partial rotary), pairs (i, i + rot_dim / 2) for i < rot_dim / 2, or with
// `interleaved` non-zero pairs (2i, 2i + 1), both turned by frequency i.
// The angles follow the CPU twin exactly: a = inv_freq[i] * pos in f32, cos / sin in double,
// rounded to f32, times attention_scaling; the rotation uses no contraction, so the result is
// the CPU twin's up to the last-ulp differences of the device's double cos / sin.

// Halves of rot_dim whose cos / sin are computed once per row into shared memory; above it each
// thread computes its own (the same values, only slower).
#define ROPE_SHARED_HALF 256

__device__ __forceinline__ void rope_angle(const float* __restrict__ inv_freq, unsigned i,
                                           unsigned pos, float scaling, float* c, float* s) {
    float a = __fmul_rn(inv_freq[i], (float)pos);
    double sd, cd;
    sincos((double)a, &sd, &cd);
    *c = __fmul_rn((float)cd, scaling);
    *s = __fmul_rn((float)sd, scaling);
}

__device__ __forceinline__ void rope_heads(float* __restrict__ row, unsigned width,
                                           unsigned head_dim, unsigned half,
                                           const float* __restrict__ cs,
                                           const float* __restrict__ sn,
                                           const float* __restrict__ inv_freq, unsigned pos,
                                           float scaling, bool cached, bool interleaved) {
    unsigned heads = width / head_dim;
    unsigned pairs = heads * half;
    for (unsigned p = threadIdx.x; p < pairs; p += blockDim.x) {
        unsigned h = p / half, i = p - h * half;
        float c, s;
        if (cached) {
            c = cs[i];
            s = sn[i];
        } else {
            rope_angle(inv_freq, i, pos, scaling, &c, &s);
        }
        float* head = row + (size_t)h * head_dim;
        unsigned a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float x1 = head[a], x2 = head[b];
        head[a] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
        head[b] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
}

// Twin: `rope_row` in runtime/src/backend/cpu/mod.rs (applied to the q row and the k row of
// each position, as the CPU backend's `rope` does).
extern "C" __global__ void __launch_bounds__(256)
rope_f32(float* __restrict__ q, float* __restrict__ k, const unsigned* __restrict__ positions,
         const float* __restrict__ inv_freq, unsigned rows, unsigned q_width, unsigned k_width,
         unsigned head_dim, unsigned rot_dim, float attention_scaling, unsigned interleaved) {
    __shared__ float cs[ROPE_SHARED_HALF];
    __shared__ float sn[ROPE_SHARED_HALF];
    unsigned r = blockIdx.x;
    if (r >= rows || head_dim == 0) return;
    unsigned half = rot_dim / 2;
    unsigned pos = positions[r];
    bool cached = half <= ROPE_SHARED_HALF;
    if (cached) {
        for (unsigned i = threadIdx.x; i < half; i += blockDim.x)
            rope_angle(inv_freq, i, pos, attention_scaling, &cs[i], &sn[i]);
        __syncthreads();
    }
    rope_heads(q + (size_t)r * q_width, q_width, head_dim, half, cs, sn, inv_freq, pos,
               attention_scaling, cached, interleaved != 0);
    rope_heads(k + (size_t)r * k_width, k_width, head_dim, half, cs, sn, inv_freq, pos,
               attention_scaling, cached, interleaved != 0);
}

// KV cache stores: n f32 values (the new keys or values of a step) written into a KV cache in
// its element type (f32, bf16 or f16).
//
// Header-free CUDA C compiled by NVRTC (kernels/src/cuda.rs lists the entry points and options).
// Launch: block = 256 threads, grid = ceil(n / 256) (grid-stride loops, so fewer blocks also
// work). The host checks that `dst` has room for n more elements of the cache's type (it passes
// the pointer to the first free element) and that `src` holds n values.
// The narrowing conversions are integer operations on the f32 bits, written to be bit-exact with
// the `half` crate (2.7) that the CPU twin uses, for every input: NaN payloads, infinities,
// subnormals and ties included. PTX `cvt.rn.bf16.f32` / `cvt.rn.f16.f32` round the same way, but
// their NaN result is not specified to keep the payload, where `half` keeps its high bits.

// `half::bf16::from_f32` (half 2.7, bfloat/convert.rs `f32_to_bf16`): a NaN keeps its sign and
// high payload bits with the quiet bit set; everything else rounds to nearest, ties to even, on
// the bits (infinities stay, overflow rounds up to infinity, subnormals round like normals).
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float v) {
    unsigned x = __float_as_uint(v);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((x >> 16) | 0x0040u);
    // Round up when the first dropped bit is set and either a later dropped bit or the kept
    // lowest bit is set (ties to even).
    unsigned up = (x & 0x8000u) != 0u && (x & 0x17FFFu) != 0u;
    return (unsigned short)((x >> 16) + up);
}

// `half::f16::from_f32` (half 2.7): on x86_64 with F16C, `vcvtps2ph` with round-to-nearest-even;
// otherwise binary16/arch.rs `f32_to_f16_fallback`. Both give the same bits for every input
// (the NaN rule of both: sign, exponent 0x1F, quiet bit 0x200 set, the payload's top ten bits),
// which this function reproduces: overflow (including ties at 65 520) gives infinity, results
// below 2^-14 are f16 subnormals rounded to nearest even, inputs of magnitude at most 2^-25
// (f32 subnormals included) give signed zero.
__device__ __forceinline__ unsigned short f32_to_f16_bits(float v) {
    unsigned x = __float_as_uint(v);
    unsigned sign = (x >> 16) & 0x8000u;
    unsigned exp = x & 0x7F800000u;
    unsigned man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        unsigned nan_bit = man != 0u ? 0x0200u : 0u;
        return (unsigned short)(sign | 0x7C00u | nan_bit | (man >> 13));
    }
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return (unsigned short)(sign | 0x7C00u);
    if (half_exp <= 0) {
        // shift = 14 - half_exp: 14 for the largest subnormal results, > 24 means even the
        // hidden bit falls below half of the smallest subnormal.
        int shift = 14 - half_exp;
        if (shift > 24) return (unsigned short)sign;
        man |= 0x00800000u;
        unsigned half_man = man >> shift;
        unsigned round_bit = 1u << (shift - 1);
        if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) half_man += 1u;
        return (unsigned short)(sign | half_man);
    }
    // A carry out of the mantissa moves into the exponent (up to 0x7C00, infinity), as in `half`.
    unsigned h = sign | ((unsigned)half_exp << 10) | (man >> 13);
    if ((man & 0x1000u) != 0u && (man & 0x2FFFu) != 0u) h += 1u;
    return (unsigned short)h;
}

// Twin: `KvData::extend` on `KvData::F32` (runtime/src/backend/cpu/attention.rs): a copy.
extern "C" __global__ void __launch_bounds__(256)
kv_store_f32(const float* __restrict__ src, float* __restrict__ dst, unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// Twin: `KvData::extend` on `KvData::Bf16`: dst[i] = half::bf16::from_f32(src[i]) (bits).
extern "C" __global__ void __launch_bounds__(256)
kv_store_bf16(const float* __restrict__ src, unsigned short* __restrict__ dst,
              unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = f32_to_bf16_bits(src[i]);
}

// Twin: `KvData::extend` on `KvData::F16`: dst[i] = half::f16::from_f32(src[i]) (bits).
extern "C" __global__ void __launch_bounds__(256)
kv_store_f16(const float* __restrict__ src, unsigned short* __restrict__ dst,
             unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = f32_to_f16_bits(src[i]);
}

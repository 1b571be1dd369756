// Quantized gather and dequantizing scatter: int8 (sm_75 and later) and fp8 e4m3 (sm_89 and later).
//
// What: `tc_quant_gather_<fmt>_<dtype>` reads blocks of an engine's paged KV cache (addressed
// exactly as in gather_scatter.cu: a per-(layer, K/V) pointer table and three byte strides)
// and writes page-first one-byte data [n, layers, planes, block_size, heads, head_dim] plus one
// float32 scale per (block, layer, K/V, head) = absmax / QMAX; `tc_dequant_scatter_...` writes
// q * scale back in the engine's dtype. The torch reference is kernels/reference_quant.py,
// and the kernels reproduce its bytes exactly: every step is one correctly rounded float32
// operation (__fdiv_rn, __fmul_rn, __float2int_rn, cvt.rn), never a fused or approximate one,
// and the absmax is order-independent.
//
// Why fused: quantizing after a plain gather would write and read the wide blocks once more;
// the fused kernel reads the cache and writes only the narrow bytes.
//
// Grid: one CTA per (block, layer, K/V) as in gather_scatter.cu; warp w of the CTA owns heads
// w, w + 8, ...: it reduces the head's block_size * head_dim values to their absmax with
// shuffles, then reads them again (from L1: a head of a 16-token block is 4 KiB at head_dim
// 128 in bf16) to quantize. Rejected: keeping the values in registers between the two passes
// (64 per lane at that shape, and the count depends on the shape).
//
// fp8: PTX's cvt.rn.satfinite.e4m3x2.f32 exists from sm_89 on; below, the fp8 kernels trap
// and kernels/cuda.py refuses to launch them (it checks the compute capability first).
// Decoding e4m3 is bit arithmetic and runs anywhere. Engine dtypes: float32, float16 and
// bfloat16, converted with PTX cvt (no cuda_fp16.h: NVRTC compiles this with no headers).

#define TC_THREADS 256
#define TC_WARPS (TC_THREADS / 32)

struct F32 {
  typedef float Storage;
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

struct F16 {
  typedef unsigned short Storage;
  static __device__ __forceinline__ float to_float(unsigned short x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
    unsigned short x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
  }
};

// float32 bits -> bfloat16 bits, rounded to nearest even as c10::BFloat16 does: overflow
// carries into the exponent and gives inf, a NaN becomes the quiet 0x7fc0. The GPUs before
// sm_80 use it; host code too (tests/kernels/test_cuda.py checks it against torch).
__host__ __device__ __forceinline__ unsigned short bf16_bits_rn(unsigned int u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return (unsigned short)0x7fc0;
  }
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct BF16 {
  typedef unsigned short Storage;
  static __device__ __forceinline__ float to_float(unsigned short x) {
    return __uint_as_float((unsigned int)x << 16);  // exact: bf16 is float32's top half
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short x;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
#else
    return bf16_bits_rn(__float_as_uint(f));  // cvt to bf16 is sm_80+
#endif
  }
};

struct Int8 {
  static constexpr float kMax = 127.0f;
  static __device__ __forceinline__ unsigned char encode(float y) {
    int q = __float2int_rn(y);  // half to even, as torch.round
    q = q > 127 ? 127 : (q < -127 ? -127 : q);
    return (unsigned char)(signed char)q;
  }
  static __device__ __forceinline__ float decode(unsigned char b) {
    return (float)(signed char)b;
  }
};

struct E4M3 {
  static constexpr float kMax = 448.0f;
  static __device__ __forceinline__ unsigned char encode(float y) {
#if __CUDA_ARCH__ >= 890
    unsigned short pair;  // the conversion of the second operand lands in the low byte
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(y));
    return (unsigned char)(pair & 0xff);
#else
    __trap();
    return 0;
#endif
  }
  static __device__ __forceinline__ float decode(unsigned char b) {
    // e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal.
    // 0x7f/0xff (NaN) are never stored: encode saturates.
    const unsigned int exp = (b >> 3) & 0xfu, man = b & 0x7u;
    const float mag = exp == 0 ? (float)man * 0.001953125f  // man * 2**-9
                               : __uint_as_float(((exp + 120u) << 23) | (man << 20));
    return (b & 0x80u) ? -mag : mag;
  }
};

// max that keeps a NaN, as torch's amax does (fmaxf alone drops it): a head holding a NaN gets
// a NaN scale, which the store refuses (tiercache/storage_format.py) instead of keeping the
// head with the NaN quantized to 0. Which NaN wins depends on the order, but any NaN makes the
// scale NaN; the other scales stay order-independent. Host code too, for the test.
__host__ __device__ __forceinline__ float nan_max(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// The (token t, element j) of head `head` of this slab, on the engine side.
template <class E>
__device__ __forceinline__ typename E::Storage* engine_at(unsigned char* paged, long long s_token,
                                                          long long s_head, unsigned int head,
                                                          unsigned int t, unsigned int j) {
  return (typename E::Storage*)(paged + (long long)t * s_token + (long long)head * s_head) + j;
}

template <class E, class Q, bool kGather>
__device__ __forceinline__ void quant_slab(const unsigned long long* __restrict__ ptrs,
                                           const long long* __restrict__ block_ids,
                                           unsigned char* __restrict__ data,
                                           float* __restrict__ scales, long long layers,
                                           long long planes, long long block_size,
                                           long long heads, long long head_dim,
                                           long long s_block, long long s_token,
                                           long long s_head) {
  const long long slab = blockIdx.x;  // (i * layers + layer) * planes + kv
  const long long layer_kv = slab % (layers * planes);  // layer * planes + kv
  const long long i = slab / (layers * planes);
  const unsigned int h = (unsigned int)heads, d = (unsigned int)head_dim;
  const unsigned int n = (unsigned int)block_size * d;  // values per head
  const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  unsigned char* paged = (unsigned char*)ptrs[layer_kv] + block_ids[i] * s_block;
  unsigned char* narrow = data + slab * block_size * heads * head_dim;

  for (unsigned int head = warp; head < h; head += TC_WARPS) {
    if (kGather) {
      float absmax = 0.0f;
      for (unsigned int e = lane; e < n; e += 32) {
        const unsigned int t = e / d, j = e - t * d;
        absmax = nan_max(absmax, fabsf(E::to_float(*engine_at<E>(paged, s_token, s_head, head, t, j))));
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        absmax = nan_max(absmax, __shfl_xor_sync(0xffffffffu, absmax, offset));
      }
      const float scale = __fdiv_rn(absmax, Q::kMax);
      const float divisor = scale > 0.0f ? scale : 1.0f;  // an all-zero head stores zeros
      if (lane == 0) {
        scales[slab * heads + head] = scale;
      }
      for (unsigned int e = lane; e < n; e += 32) {
        const unsigned int t = e / d, j = e - t * d;
        const float x = E::to_float(*engine_at<E>(paged, s_token, s_head, head, t, j));
        narrow[(t * h + head) * d + j] = Q::encode(__fdiv_rn(x, divisor));
      }
    } else {
      const float scale = scales[slab * heads + head];
      for (unsigned int e = lane; e < n; e += 32) {
        const unsigned int t = e / d, j = e - t * d;
        const float q = Q::decode(narrow[(t * h + head) * d + j]);
        *engine_at<E>(paged, s_token, s_head, head, t, j) = E::from_float(__fmul_rn(q, scale));
      }
    }
  }
}

#define TC_QUANT_KERNEL(NAME, E, Q, GATHER)                                                   \
  extern "C" __global__ void __launch_bounds__(TC_THREADS)                                   \
      NAME(const unsigned long long* __restrict__ ptrs,                                       \
           const long long* __restrict__ block_ids, unsigned char* __restrict__ data,         \
           float* __restrict__ scales, long long layers, long long planes,                    \
           long long block_size, long long heads, long long head_dim, long long s_block,      \
           long long s_token, long long s_head) {                                             \
    quant_slab<E, Q, GATHER>(ptrs, block_ids, data, scales, layers, planes, block_size,       \
                             heads, head_dim, s_block, s_token, s_head);                      \
  }

TC_QUANT_KERNEL(tc_quant_gather_int8_float32, F32, Int8, true)
TC_QUANT_KERNEL(tc_quant_gather_int8_float16, F16, Int8, true)
TC_QUANT_KERNEL(tc_quant_gather_int8_bfloat16, BF16, Int8, true)
TC_QUANT_KERNEL(tc_quant_gather_fp8_float32, F32, E4M3, true)
TC_QUANT_KERNEL(tc_quant_gather_fp8_float16, F16, E4M3, true)
TC_QUANT_KERNEL(tc_quant_gather_fp8_bfloat16, BF16, E4M3, true)
TC_QUANT_KERNEL(tc_dequant_scatter_int8_float32, F32, Int8, false)
TC_QUANT_KERNEL(tc_dequant_scatter_int8_float16, F16, Int8, false)
TC_QUANT_KERNEL(tc_dequant_scatter_int8_bfloat16, BF16, Int8, false)
TC_QUANT_KERNEL(tc_dequant_scatter_fp8_float32, F32, E4M3, false)
TC_QUANT_KERNEL(tc_dequant_scatter_fp8_float16, F16, E4M3, false)
TC_QUANT_KERNEL(tc_dequant_scatter_fp8_bfloat16, BF16, E4M3, false)

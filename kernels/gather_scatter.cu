// Gather/scatter of KV blocks between an engine's paged cache and page-first blocks.
//
// What: `gather` copies blocks `block_ids` of every layer of an engine's KV cache into
// contiguous page-first blocks [n, layers, planes, block_size, heads, head_dim]; `scatter` is
// the reverse. `planes` is 2 (K and V) or 1 (an MLA latent: heads 1, head_dim the latent).
// All layers move in ONE launch: the layers' base addresses come from a device array.
// The torch reference (kernels/reference.py) is the oracle; these kernels must equal it byte
// for byte.
//
// One addressing for all three layouts. The host (kernels/cuda.py) resolves the layout into
// a table ptrs[layer * planes + kv] = byte address of (layer, K/V, block 0, token 0, head 0)
// and three byte strides shared by all layers, so the (token, head) row of head_dim elements is
//     ptrs[layer * planes + kv] + block * s_block + token * s_token + head * s_head
//   vllm       [2, nb, bs, h, d]:  ptrs = base + kv * stride0,  s_block = stride1
//   flashinfer [nb, 2, bs, h, d]:  ptrs = base + kv * stride1,  s_block = stride0
//   hf         K, V [b, h, s, d]:  ptrs = K or V + batch * stride0, s_token = stride2,
//                                  s_block = block_size * s_token (token = block * bs + t)
//   vllm MLA   [nb, bs, latent]:   ptrs = base (one plane), s_block = stride0, s_token = stride1
// Rejected: one kernel per layout. They would differ only in these three lines of address
// arithmetic, and strided views (every other block, one batch row) would need a fourth.
//
// Dtype-agnostic: rows are moved as bytes (row_bytes = head_dim * element size), with 16-byte
// vector accesses when every address and stride is a multiple of 16, else one byte at
// a time. The host chooses per launch (`..._v16` or `..._b1`): a kernel that checked alignment
// per row would branch in the inner loop and could not be told apart in a profile.
//
// Grid: one CTA per (block, layer, K/V), blockIdx.x = (i * layers + layer) * planes + kv. Its
// slab of block_size * heads rows is contiguous on the page-first side, so consecutive
// threads write consecutive 16-byte units, and on the engine side each row (256 bytes for
// head_dim 128 in bf16) is read whole by 16 consecutive threads. Llama-3-8B (32 layers, 8
// heads x 128, 16-token blocks, bf16) gives 32 KiB per CTA and 64 CTAs per block, enough to
// fill an H100's 132 SMs from two blocks on. Rejected: one CTA per block id (too few CTAs for
// a short prefix) and one per row (256-byte CTAs, launch-bound).
//
// Each thread loads UNROLL units before it stores any, so that several loads are in flight
// per thread: a copy is bound by memory latency otherwise.
//
// The flat path (`..._flat`). Measured on an H100 (docs/results/gpu.txt), the strided kernel
// above moved Llama-3-8B blocks at 0.53x a device-to-device copy and a small-head model's
// (Qwen2.5-0.5B: 4 KiB slabs) at 0.10x: per 16-byte unit it divides twice (the row, then the
// row's token and head), and a 4 KiB slab gives each of its 256 threads one unit, so one load
// in flight per thread. But in the common case the engine side of a slab is ONE contiguous
// run: vLLM [2, nb, bs, h, d] and FlashInfer [nb, 2, bs, h, d] caches with contiguous rows
// have s_head == row_bytes and s_token == heads * row_bytes (s_block may be anything: every
// other block of a wider cache is still flat). Then a slab is a flat copy of
// slab_units = block_size * heads * row_bytes / 16 vectors, and the kernel needs no row at
// all. The host (kernels/cuda.py) takes this path when the slab is flat and everything is
// 16-byte aligned, else v16, else b1.
//
// Its grid: the work is cut into items of one warp each: (slab, chunk), a chunk being
// TC_CHUNK = 32 lanes x TC_FLAT_UNROLL = 256 vectors (4 KiB). Lane l copies vectors
// chunk * 256 + k * 32 + l, k < 8: each k is one coalesced 512-byte access per warp, and each
// lane has 8 loads in flight before its first store. The item's (slab, chunk) and the slab's
// (block, layer, K/V) cost a few divisions once per warp per 4 KiB, none per vector. A 4 KiB
// slab (Qwen2.5-0.5B) is one item; Llama-3-8B's 32 KiB slab is 8 items on 8 warps, so 256
// blocks give 131072 warps where the strided grid gives 16384 CTAs with one slab each.
// Rejected: a grid-stride loop over items with a fixed grid (each warp's items then run one
// after another, with only one item's loads in flight), and tracking (slab, offset) per
// vector to let one CTA span several small slabs (a loop per vector instead of a division
// per warp). The quantized kernels (quant.cu) keep their per-slab grid: their per-head
// absmax needs a head's rows together.
//
// Tuned on an H100 (.cu compiled with -DTC_FLAT_UNROLL / -DTC_THREADS, launch table already
// on the device): 2 to 16 vectors per lane and 128 to 512 threads per CTA all moved both
// benchmark shapes at 0.95-0.98x a device-to-device copy, within 3% of each other; the
// defaults stay. What the benchmark had lost (0.79x for 4 KiB slabs) was the table's upload
// in line on the stream, which kernels/cuda.py now queues on a side stream.
//
// Compiled by CuPy's NVRTC at run time and by nvcc in CI (tests/kernels/test_cuda.py):
// no headers, so that both compile it unchanged.

// The flat kernels' sizes may be overridden with -D (the tuning runs do; kernels/cuda.py
// launches the defaults).
#ifndef TC_THREADS
#define TC_THREADS 256
#endif
#define TC_UNROLL 4
#define TC_WARPS (TC_THREADS / 32)
#ifndef TC_FLAT_UNROLL
#define TC_FLAT_UNROLL 8
#endif
#define TC_CHUNK (32 * TC_FLAT_UNROLL)  // vectors per warp item: 4 KiB

// Own types rather than CUDA's uint4/uchar1: no header is needed under NVRTC.
struct alignas(16) Vec16 {
  unsigned int x, y, z, w;
};
struct Byte1 {
  unsigned char b;
};

template <typename V, bool kGather>
__device__ __forceinline__ void copy_slab(const unsigned long long* __restrict__ ptrs,
                                          const long long* __restrict__ block_ids,
                                          unsigned char* __restrict__ blocks, long long layers,
                                          long long planes, long long block_size,
                                          long long heads, long long row_bytes, long long s_block,
                                          long long s_token, long long s_head) {
  const long long slab = blockIdx.x;  // (i * layers + layer) * planes + kv
  const long long layer_kv = slab % (layers * planes);  // layer * planes + kv
  const long long i = slab / (layers * planes);
  // 32-bit index arithmetic inside a slab (a slab is far below 4 GiB); 64-bit byte offsets.
  const unsigned int h = (unsigned int)heads;
  const unsigned int units_per_row = (unsigned int)(row_bytes / sizeof(V));
  const unsigned int units = (unsigned int)block_size * h * units_per_row;

  unsigned char* paged =
      (unsigned char*)ptrs[layer_kv] + block_ids[i] * s_block;  // this block's (0, 0)
  unsigned char* linear = blocks + slab * block_size * heads * row_bytes;

  for (unsigned int base = threadIdx.x; base < units; base += TC_UNROLL * TC_THREADS) {
    V r[TC_UNROLL];
#pragma unroll
    for (int k = 0; k < TC_UNROLL; ++k) {
      const unsigned int u = base + k * TC_THREADS;
      if (u < units) {
        const unsigned int row = u / units_per_row;
        const unsigned int col = u - row * units_per_row;
        V* p = (V*)(paged + (long long)(row / h) * s_token + (long long)(row % h) * s_head) + col;
        V* q = (V*)linear + u;
        r[k] = kGather ? *p : *q;
      }
    }
#pragma unroll
    for (int k = 0; k < TC_UNROLL; ++k) {
      const unsigned int u = base + k * TC_THREADS;
      if (u < units) {
        const unsigned int row = u / units_per_row;
        const unsigned int col = u - row * units_per_row;
        V* p = (V*)(paged + (long long)(row / h) * s_token + (long long)(row % h) * s_head) + col;
        V* q = (V*)linear + u;
        if (kGather) {
          *q = r[k];
        } else {
          *p = r[k];
        }
      }
    }
  }
}

#define TC_COPY_KERNEL(NAME, V, GATHER)                                                      \
  extern "C" __global__ void __launch_bounds__(TC_THREADS)                                  \
      NAME(const unsigned long long* __restrict__ ptrs,                                      \
           const long long* __restrict__ block_ids, unsigned char* __restrict__ blocks,      \
           long long layers, long long planes, long long block_size, long long heads,         \
           long long row_bytes, long long s_block, long long s_token, long long s_head) {     \
    copy_slab<V, GATHER>(ptrs, block_ids, blocks, layers, planes, block_size, heads,         \
                         row_bytes, s_block, s_token, s_head);                               \
  }

TC_COPY_KERNEL(tc_gather_v16, Vec16, true)
TC_COPY_KERNEL(tc_gather_b1, Byte1, true)
TC_COPY_KERNEL(tc_scatter_v16, Vec16, false)
TC_COPY_KERNEL(tc_scatter_b1, Byte1, false)

// items = slabs * chunks, chunks = ceil(slab_units / TC_CHUNK); the host keeps items and
// slab_units below 2^31 (32-bit index arithmetic) and launches ceil(items / TC_WARPS) CTAs.
template <bool kGather>
__device__ __forceinline__ void copy_flat(const unsigned long long* __restrict__ ptrs,
                                          const long long* __restrict__ block_ids,
                                          Vec16* __restrict__ blocks, unsigned int items,
                                          unsigned int layers, unsigned int planes,
                                          unsigned int slab_units, unsigned int chunks,
                                          long long s_block) {
  const unsigned int item = blockIdx.x * TC_WARPS + threadIdx.x / 32;
  if (item >= items) {
    return;
  }
  const unsigned int lane = threadIdx.x % 32;
  const unsigned int slab = item / chunks;  // (i * layers + layer) * planes + kv
  const unsigned int chunk = item - slab * chunks;
  const unsigned int i = slab / (layers * planes);
  const unsigned int layer_kv = slab - i * layers * planes;  // layer * planes + kv

  Vec16* paged = (Vec16*)((unsigned char*)ptrs[layer_kv] + block_ids[i] * s_block);
  Vec16* linear = blocks + (unsigned long long)slab * slab_units;
  const Vec16* __restrict__ src = kGather ? paged : linear;
  Vec16* __restrict__ dst = kGather ? linear : paged;
  const unsigned int first = chunk * TC_CHUNK + lane;

  Vec16 r[TC_FLAT_UNROLL];
#pragma unroll
  for (int k = 0; k < TC_FLAT_UNROLL; ++k) {
    const unsigned int u = first + k * 32;
    if (u < slab_units) {
      r[k] = src[u];
    }
  }
#pragma unroll
  for (int k = 0; k < TC_FLAT_UNROLL; ++k) {
    const unsigned int u = first + k * 32;
    if (u < slab_units) {
      dst[u] = r[k];
    }
  }
}

#define TC_FLAT_KERNEL(NAME, GATHER)                                                          \
  extern "C" __global__ void __launch_bounds__(TC_THREADS)                                  \
      NAME(const unsigned long long* __restrict__ ptrs,                                      \
           const long long* __restrict__ block_ids, Vec16* __restrict__ blocks,               \
           unsigned int items, unsigned int layers, unsigned int planes,                     \
           unsigned int slab_units, unsigned int chunks, long long s_block) {                \
    copy_flat<GATHER>(ptrs, block_ids, blocks, items, layers, planes, slab_units, chunks,    \
                      s_block);                                                              \
  }

TC_FLAT_KERNEL(tc_gather_flat, true)
TC_FLAT_KERNEL(tc_scatter_flat, false)

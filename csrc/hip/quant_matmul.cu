// W4A16 quantized matmul in the CUDA/HIP common subset: y[M, N] = x[M, K] @ dequantize(W[N, K])^T,
// W kept as 4-bit ggml blocks (q4_0, iq4_nl, rq4: fp16 scale d + 16 bytes of indices, 4.5 bits/weight)
// and decoded in registers as d * lut[index]. The 16-entry value table and the nibble order are kernel
// arguments that come from felix/formats.py (felix.reference.qmatmul.four_bit_layout): no codebook
// lives in this file.
//
// The same file builds with nvcc (NVIDIA), with hipcc for AMD (checked for gfx1101, RDNA3, wave32),
// and through PyTorch's cpp_extension on ROCm (which hipifies it). Warp-level code assumes 32-lane
// groups and shuffles with width 32, so it is correct on wave32 (RDNA) and wave64 (CDNA) alike.
//
// * GEMV (decode, M <= 8): one 32-lane warp per output row; 4 lanes share a block (each decodes 4 index
//   bytes = 8 weights), so a warp streams 8 consecutive blocks (144 contiguous bytes) per step; fp32
//   accumulation, then a butterfly reduction over the warp.
// * GEMM (prefill): 64 x 64 output tiles, K steps of one block (32); activations and decoded weights
//   staged in shared memory as fp32, 4 x 4 outputs per thread, fp32 FMA accumulation.
#include "quant_matmul.h"

// FELIX_QMM_CPU_EMULATION: tests/test_hip_emulation.py compiles this file with g++ against
// tests/hip_emulation/ (fake cuda_runtime.h / cuda_fp16.h running each thread block as CPU threads), so
// the kernels' indexing, nibble order, masking and warp reductions are checked without a GPU.
#ifndef FELIX_QMM_CPU_EMULATION
#define FELIX_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIP__)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#define FELIX_SHFL_XOR(v, mask) __shfl_xor((v), (mask), 32)
typedef hipStream_t felix_stream_t;
#define FELIX_LAST_ERROR() hipGetLastError()
#define FELIX_ERROR_STRING(e) hipGetErrorString(e)
#define FELIX_SUCCESS hipSuccess
typedef hipError_t felix_error_t;
// Compiler builtins rather than threadIdx / blockIdx / fmaf / __syncthreads, which ROCm's headers route through the
// device libraries (ockl / ocml): the code is the same, and the gfx1101 compile check, which cannot
// link Debian's ROCm 5.2 device libraries for gfx1101, sees every instruction inline.
#define FELIX_TID() static_cast<int>(__builtin_amdgcn_workitem_id_x())
#define FELIX_BID_X() static_cast<int>(__builtin_amdgcn_workgroup_id_x())
#define FELIX_BID_Y() static_cast<int>(__builtin_amdgcn_workgroup_id_y())
#define FELIX_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#define FELIX_SYNC()                                      \
  do {                                                    \
    __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup"); \
    __builtin_amdgcn_s_barrier();                         \
    __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup"); \
  } while (0)
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#define FELIX_SHFL_XOR(v, mask) __shfl_xor_sync(0xffffffffu, (v), (mask), 32)
typedef cudaStream_t felix_stream_t;
#define FELIX_LAST_ERROR() cudaGetLastError()
#define FELIX_ERROR_STRING(e) cudaGetErrorString(e)
#define FELIX_SUCCESS cudaSuccess
typedef cudaError_t felix_error_t;
#define FELIX_TID() static_cast<int>(threadIdx.x)
#define FELIX_BID_X() static_cast<int>(blockIdx.x)
#define FELIX_BID_Y() static_cast<int>(blockIdx.y)
#define FELIX_FMA(a, b, c) __fmaf_rn((a), (b), (c))
#define FELIX_SYNC() __syncthreads()
#endif

namespace felix_qmm {

constexpr int kWarp = 32;
constexpr int kBlockBytes = 18;
constexpr int kGemvWarps = 4;                    // output rows per GEMV thread block
constexpr int kGemvThreads = kGemvWarps * kWarp;
constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kGemmThreads = 256;

// ------------------------------------------------------------------------ activations (fp32/fp16/bf16)
// fp16 and bf16 travel as raw 16-bit patterns: the conversions below are the same on both toolchains.
template <int KIND> struct Act;
template <> struct Act<FELIX_ACT_F32> {
  typedef float T;
  static __device__ __forceinline__ void load4(const T* p, float out[4]) {  // p is 16-byte aligned
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
  static __device__ __forceinline__ void store(T* p, float v) { *p = v; }
};
template <> struct Act<FELIX_ACT_F16> {
  typedef uint16_t T;
  static __device__ __forceinline__ float to_float(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  static __device__ __forceinline__ void load4(const T* p, float out[4]) {  // p is 8-byte aligned
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    out[0] = to_float(v.x & 0xFFFFu); out[1] = to_float(v.x >> 16);
    out[2] = to_float(v.y & 0xFFFFu); out[3] = to_float(v.y >> 16);
  }
  static __device__ __forceinline__ void store(T* p, float v) { *p = __half_as_ushort(__float2half_rn(v)); }
};
template <> struct Act<FELIX_ACT_BF16> {
  typedef uint16_t T;
  static __device__ __forceinline__ float to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
  static __device__ __forceinline__ void load4(const T* p, float out[4]) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    out[0] = to_float(v.x & 0xFFFFu); out[1] = to_float(v.x >> 16);
    out[2] = to_float(v.y & 0xFFFFu); out[3] = to_float(v.y >> 16);
  }
  static __device__ __forceinline__ void store(T* p, float v) {  // round to nearest even; NaN stays NaN
    uint32_t u = __float_as_uint(v);
    uint32_t r = (v != v) ? (u | 0x400000u) : u + 0x7FFFu + ((u >> 16) & 1u);
    *p = static_cast<uint16_t>(r >> 16);
  }
};

// ------------------------------------------------------------------------------- block decoding
// A quarter of a block: index bytes 4*sub .. 4*sub+3 decoded to 8 weights, in the order of the
// activations that load8() returns (pairs: elements 8sub .. 8sub+7; halves: 4sub .. 4sub+3 then
// 16+4sub .. 16+4sub+3).
template <bool PAIRS>
__device__ __forceinline__ void decode_quarter(const uint8_t* blk, int sub, const float* lut, float w[8]) {
  const uint16_t* b16 = reinterpret_cast<const uint16_t*>(blk);  // blocks are 18 bytes: 2-byte aligned
  const float d = __half2float(__ushort_as_half(b16[0]));
  const uint32_t q = static_cast<uint32_t>(b16[1 + 2 * sub]) | (static_cast<uint32_t>(b16[2 + 2 * sub]) << 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t byte = (q >> (8 * i)) & 0xFFu;
    const float lo = lut[byte & 0xFu] * d, hi = lut[byte >> 4] * d;
    if (PAIRS) { w[2 * i] = lo; w[2 * i + 1] = hi; }
    else { w[i] = lo; w[4 + i] = hi; }
  }
}

template <int KIND, bool PAIRS>
__device__ __forceinline__ void load8(const typename Act<KIND>::T* xblk, int sub, float a[8]) {
  if (PAIRS) { Act<KIND>::load4(xblk + 8 * sub, a); Act<KIND>::load4(xblk + 8 * sub + 4, a + 4); }
  else { Act<KIND>::load4(xblk + 4 * sub, a); Act<KIND>::load4(xblk + 16 + 4 * sub, a + 4); }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += FELIX_SHFL_XOR(v, off);
  return v;
}

// ------------------------------------------------------------------------------------------ GEMV
template <int KIND, int MMAX, bool PAIRS>
__global__ void __launch_bounds__(kGemvThreads)
qmm_gemv(const typename Act<KIND>::T* __restrict__ x, const uint8_t* __restrict__ w,
         const float* __restrict__ lut, typename Act<KIND>::T* __restrict__ y,
         int M, int N, int K, int64_t stride_xm, int64_t stride_ym) {
  __shared__ float s_lut[16];
  if (FELIX_TID() < 16) s_lut[FELIX_TID()] = lut[FELIX_TID()];
  FELIX_SYNC();
  const int lane = FELIX_TID() % kWarp;
  const int n = FELIX_BID_X() * kGemvWarps + FELIX_TID() / kWarp;
  if (n >= N) return;
  const int kb_total = K / 32;
  const uint8_t* row = w + static_cast<int64_t>(n) * kb_total * kBlockBytes;
  const int sub = lane & 3;
  float acc[MMAX];
#pragma unroll
  for (int m = 0; m < MMAX; ++m) acc[m] = 0.0f;
  for (int kb = lane >> 2; kb < kb_total; kb += kWarp / 4) {
    float wv[8];
    decode_quarter<PAIRS>(row + kb * kBlockBytes, sub, s_lut, wv);
#pragma unroll
    for (int m = 0; m < MMAX; ++m) {
      if (m < M) {
        float a[8];
        load8<KIND, PAIRS>(x + m * stride_xm + kb * 32, sub, a);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m] = FELIX_FMA(a[i], wv[i], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MMAX; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0 && m < M) Act<KIND>::store(y + m * stride_ym + n, s);
  }
}

// ------------------------------------------------------------------------------------------ GEMM
template <int KIND, bool PAIRS>
__global__ void __launch_bounds__(kGemmThreads)
qmm_gemm(const typename Act<KIND>::T* __restrict__ x, const uint8_t* __restrict__ w,
         const float* __restrict__ lut, typename Act<KIND>::T* __restrict__ y,
         int M, int N, int K, int64_t stride_xm, int64_t stride_ym) {
  __shared__ float s_lut[16];
  __shared__ float xs[kTileK][kTileM + 4];  // k-major, padded against bank conflicts
  __shared__ float ws[kTileK][kTileN + 4];
  const int t = FELIX_TID();
  if (t < 16) s_lut[t] = lut[t];
  const int m0 = FELIX_BID_Y() * kTileM, n0 = FELIX_BID_X() * kTileN;
  const int kb_total = K / 32;
  const int ty = t / 16, tx = t % 16;       // this thread's 4 x 4 outputs
  const int load_row = t / 4, sub = t % 4;  // staging: 4 threads per row, 8 elements each
  float acc[4][4] = {};
  FELIX_SYNC();
  for (int kb = 0; kb < kb_total; ++kb) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, wv[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (m0 + load_row < M) load8<KIND, PAIRS>(x + (m0 + load_row) * stride_xm + kb * 32, sub, a);
    if (n0 + load_row < N)
      decode_quarter<PAIRS>(w + (static_cast<int64_t>(n0 + load_row) * kb_total + kb) * kBlockBytes, sub, s_lut, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int k = PAIRS ? 8 * sub + i : (i < 4 ? 4 * sub + i : 16 + 4 * sub + (i - 4));
      xs[k][load_row] = a[i];
      ws[k][load_row] = wv[i];
    }
    FELIX_SYNC();
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { av[i] = xs[k][ty * 4 + i]; bv[i] = ws[k][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = FELIX_FMA(av[i], bv[j], acc[i][j]);
    }
    FELIX_SYNC();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n < N) Act<KIND>::store(y + m * stride_ym + n, acc[i][j]);
    }
  }
}

// ------------------------------------------------------------------------------------- launchers
template <int KIND, int MMAX, bool PAIRS>
void launch_gemv(const void* x, const uint8_t* w, const float* lut, void* y, int M, int N, int K,
                 int64_t sxm, int64_t sym, felix_stream_t stream) {
  typedef typename Act<KIND>::T T;
  const dim3 grid((N + kGemvWarps - 1) / kGemvWarps);
  auto kernel = qmm_gemv<KIND, MMAX, PAIRS>;
  FELIX_LAUNCH(kernel, grid, dim3(kGemvThreads), stream)(
      static_cast<const T*>(x), w, lut, static_cast<T*>(y), M, N, K, sxm, sym);
}

template <int KIND, bool PAIRS>
void launch(const void* x, const uint8_t* w, const float* lut, void* y, int M, int N, int K,
            int64_t sxm, int64_t sym, felix_stream_t stream) {
  typedef typename Act<KIND>::T T;
  if (M <= 1) launch_gemv<KIND, 1, PAIRS>(x, w, lut, y, M, N, K, sxm, sym, stream);
  else if (M <= 2) launch_gemv<KIND, 2, PAIRS>(x, w, lut, y, M, N, K, sxm, sym, stream);
  else if (M <= 4) launch_gemv<KIND, 4, PAIRS>(x, w, lut, y, M, N, K, sxm, sym, stream);
  else if (M <= FELIX_QMM_GEMV_MAX_M) launch_gemv<KIND, 8, PAIRS>(x, w, lut, y, M, N, K, sxm, sym, stream);
  else {
    const dim3 grid((N + kTileN - 1) / kTileN, (M + kTileM - 1) / kTileM);
    auto kernel = qmm_gemm<KIND, PAIRS>;
    FELIX_LAUNCH(kernel, grid, dim3(kGemmThreads), stream)(
        static_cast<const T*>(x), w, lut, static_cast<T*>(y), M, N, K, sxm, sym);
  }
}

template <int KIND>
void launch_kind(bool pairs, const void* x, const uint8_t* w, const float* lut, void* y, int M, int N,
                 int K, int64_t sxm, int64_t sym, felix_stream_t stream) {
  if (pairs) launch<KIND, true>(x, w, lut, y, M, N, K, sxm, sym, stream);
  else launch<KIND, false>(x, w, lut, y, M, N, K, sxm, sym, stream);
}

}  // namespace felix_qmm

const char* felix_qmm_launch(int act_kind, bool pairs, const void* x, const uint8_t* w, const float* lut,
                             void* y, int M, int N, int K, int64_t stride_xm, int64_t stride_ym,
                             void* stream) {
  using namespace felix_qmm;
  if (K % 32 != 0) return "K must be a multiple of 32 (whole 32-weight blocks)";
  if (stride_xm % 4 != 0) return "activation rows must start on 4-element boundaries";
  if (M == 0 || N == 0) return nullptr;
  felix_stream_t s = static_cast<felix_stream_t>(stream);
  switch (act_kind) {
    case FELIX_ACT_F32: launch_kind<FELIX_ACT_F32>(pairs, x, w, lut, y, M, N, K, stride_xm, stride_ym, s); break;
    case FELIX_ACT_F16: launch_kind<FELIX_ACT_F16>(pairs, x, w, lut, y, M, N, K, stride_xm, stride_ym, s); break;
    case FELIX_ACT_BF16: launch_kind<FELIX_ACT_BF16>(pairs, x, w, lut, y, M, N, K, stride_xm, stride_ym, s); break;
    default: return "unknown activation kind (expected fp32, fp16 or bf16)";
  }
  const felix_error_t err = FELIX_LAST_ERROR();
  return err == FELIX_SUCCESS ? nullptr : FELIX_ERROR_STRING(err);
}

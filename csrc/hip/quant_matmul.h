// Host interface of csrc/hip/quant_matmul.cu: y[M, N] = x[M, K] @ dequantize(W[N, K])^T for 4-bit,
// 32-weight ggml blocks (q4_0, iq4_nl, rq4: fp16 scale + 16 index bytes). Free of CUDA/HIP headers so
// the torch binding compiles as plain C++.
#pragma once
#include <cstdint>

enum FelixActKind { FELIX_ACT_F32 = 0, FELIX_ACT_F16 = 1, FELIX_ACT_BF16 = 2 };

// Largest M the GEMV (decode) kernel takes; larger M runs the tiled GEMM kernel.
constexpr int FELIX_QMM_GEMV_MAX_M = 8;

// x: M x K activations (row stride stride_xm elements, 8-byte aligned rows), w: N rows of K/32 blocks
// of 18 bytes, lut: 16 floats on the device (index -> value in units of the scale, from
// felix/formats.py via felix.reference.qmatmul.four_bit_layout), pairs: nibble order (true: byte j holds
// elements 2j, 2j+1; false: j, j+16), y: M x N (row stride stride_ym), same dtype as x.
// stream: a cudaStream_t / hipStream_t. Returns nullptr on success, else an error message.
const char* felix_qmm_launch(int act_kind, bool pairs, const void* x, const uint8_t* w, const float* lut,
                             void* y, int M, int N, int K, int64_t stride_xm, int64_t stride_ym,
                             void* stream);

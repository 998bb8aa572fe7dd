// PyTorch binding of csrc/hip/quant_matmul.cu as the extension felix._C_gpu, built by setup.py with
// torch.utils.cpp_extension only when torch has CUDA or ROCm (on ROCm, PyTorch hipifies both files).
// Validation with clear messages lives in felix/ops/qmatmul.py; the checks here guard the raw pointers.
//
// Only torch/extension.h: the caller (felix/ops/qmatmul.py) passes the current stream's handle and runs
// under the tensors' device, so no c10/cuda header is needed and the file compiles against any torch.
#include <torch/extension.h>

#include "quant_matmul.h"

namespace {

torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor blocks, torch::Tensor lut, bool pairs,
                           int64_t out_features, int64_t stream) {
  TORCH_CHECK(x.is_cuda() && blocks.is_cuda() && lut.is_cuda(), "quant_matmul: x, blocks and lut must be GPU tensors");
  TORCH_CHECK(x.dim() == 2, "quant_matmul: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8, "quant_matmul: blocks must be uint8");
  TORCH_CHECK(lut.scalar_type() == torch::kFloat32 && lut.numel() == 16, "quant_matmul: lut must be 16 float32");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K % 32 == 0, "quant_matmul: K (", K, ") must be a multiple of 32");
  TORCH_CHECK(blocks.numel() == N * (K / 32) * 18, "quant_matmul: blocks hold ", blocks.numel(),
              " bytes, [", N, ", ", K, "] needs ", N * (K / 32) * 18);
  int kind;
  switch (x.scalar_type()) {
    case torch::kFloat32: kind = FELIX_ACT_F32; break;
    case torch::kFloat16: kind = FELIX_ACT_F16; break;
    case torch::kBFloat16: kind = FELIX_ACT_BF16; break;
    default: TORCH_CHECK(false, "quant_matmul: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  x = x.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();  // vector loads need alignment
  blocks = blocks.contiguous();
  lut = lut.contiguous();
  auto y = torch::empty({M, N}, x.options());
  const char* err = felix_qmm_launch(kind, pairs, x.data_ptr(), blocks.data_ptr<uint8_t>(), lut.data_ptr<float>(),
                                     y.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                     x.stride(0), y.stride(0), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "quant_matmul kernel launch failed: ", err ? err : "");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Felix W4A16 quantized matmul (HIP/CUDA): y = x @ dequantize(blocks)^T";
  m.def("quant_matmul", &quant_matmul, "x [M, K], blocks uint8 [N, K/32*18], lut float32[16], pairs, N, stream handle -> y [M, N]",
        pybind11::arg("x"), pybind11::arg("blocks"), pybind11::arg("lut"), pybind11::arg("pairs"),
        pybind11::arg("out_features"), pybind11::arg("stream"));
}

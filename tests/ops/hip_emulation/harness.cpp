// Runs felix_qmm_launch (csrc/hip/quant_matmul.cu, compiled with the CPU emulation headers beside this
// file) on one problem read from a file: int32 kind, pairs, M, N, K; float32 lut[16]; x bytes; w bytes.
// Writes y (M x N, x's dtype) to the output file.
#include <cstdio>
#include <fstream>
#include <vector>

#include "quant_matmul.h"

int main(int argc, char** argv) {
  if (argc != 3) { std::fprintf(stderr, "usage: %s input output\n", argv[0]); return 2; }
  std::ifstream in(argv[1], std::ios::binary);
  int32_t hdr[5];
  in.read(reinterpret_cast<char*>(hdr), sizeof hdr);
  const int kind = hdr[0], pairs = hdr[1], M = hdr[2], N = hdr[3], K = hdr[4];
  const size_t elem = kind == FELIX_ACT_F32 ? 4 : 2;
  std::vector<float> lut(16);
  in.read(reinterpret_cast<char*>(lut.data()), 64);
  std::vector<float> x((static_cast<size_t>(M) * K * elem + 3) / 4 + 4);  // float storage: 16-byte aligned rows
  in.read(reinterpret_cast<char*>(x.data()), static_cast<std::streamsize>(static_cast<size_t>(M) * K * elem));
  std::vector<uint8_t> w(static_cast<size_t>(N) * (K / 32) * 18);
  in.read(reinterpret_cast<char*>(w.data()), static_cast<std::streamsize>(w.size()));
  if (!in) { std::fprintf(stderr, "short input\n"); return 2; }
  std::vector<float> y((static_cast<size_t>(M) * N * elem + 3) / 4 + 1);
  const char* err = felix_qmm_launch(kind, pairs != 0, x.data(), w.data(), lut.data(), y.data(), M, N, K, K, N, nullptr);
  if (err) { std::fprintf(stderr, "%s\n", err); return 1; }
  std::ofstream out(argv[2], std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data()), static_cast<std::streamsize>(static_cast<size_t>(M) * N * elem));
  return 0;
}

// pybind11 bindings of the Felix CPU ops: module `felix._C`. Works on raw buffers (numpy views of
// torch tensors), so the extension builds without torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "codecs.h"

namespace py = pybind11;
using felix::Layout;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

const float* checked_codebook(const Layout& L, const FloatArray& codebook) {
    if (codebook.size() != L.codebook_size)
        throw std::invalid_argument(std::string(L.name) + ": codebook must have " +
                                    std::to_string(L.codebook_size) + " entries, got " +
                                    std::to_string(codebook.size()));
    return L.codebook_size ? codebook.data() : nullptr;
}

int64_t checked_blocks(const Layout& L, int64_t n_values, int64_t n_bytes) {
    if (n_values % L.block_size)
        throw std::invalid_argument(std::string(L.name) + ": " + std::to_string(n_values) +
                                    " values are not a whole number of " + std::to_string(L.block_size) +
                                    "-weight blocks");
    const int64_t n_blocks = n_values / L.block_size;
    if (n_bytes != n_blocks * L.bytes_per_block)
        throw std::invalid_argument(std::string(L.name) + ": " + std::to_string(n_blocks) + " blocks need " +
                                    std::to_string(n_blocks * L.bytes_per_block) + " bytes, buffer has " +
                                    std::to_string(n_bytes));
    return n_blocks;
}

void quantize(const std::string& fmt, const FloatArray& src, ByteArray dst, const FloatArray& codebook) {
    const Layout& L = felix::layout_for(fmt);
    const int64_t n_blocks = checked_blocks(L, src.size(), dst.size());
    const float* cb = checked_codebook(L, codebook);
    const float* in = src.data();
    uint8_t* out = dst.mutable_data();
    py::gil_scoped_release release;
    felix::quantize(L, in, out, n_blocks, cb);
}

void dequantize(const std::string& fmt, const ByteArray& src, FloatArray dst, const FloatArray& codebook) {
    const Layout& L = felix::layout_for(fmt);
    const int64_t n_blocks = checked_blocks(L, dst.size(), src.size());
    const float* cb = checked_codebook(L, codebook);
    const uint8_t* in = src.data();
    float* out = dst.mutable_data();
    py::gil_scoped_release release;
    felix::dequantize(L, in, out, n_blocks, cb);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "Felix C++ CPU ops (OpenMP): ggml block codecs, byte-exact with ggml.";
    m.def("quantize", &quantize, py::arg("fmt"), py::arg("src"), py::arg("dst"), py::arg("codebook"),
          "Quantize float32 `src` into ggml blocks in `dst` (uint8), in parallel.");
    m.def("dequantize", &dequantize, py::arg("fmt"), py::arg("src"), py::arg("dst"), py::arg("codebook"),
          "Decode ggml blocks `src` (uint8) into float32 `dst`, in parallel.");
    m.def("layouts", []() {
        py::dict out;
        for (const Layout& L : felix::kLayouts)
            out[L.name] = py::dict(py::arg("ggml_type") = L.ggml_type, py::arg("block_size") = L.block_size,
                                   py::arg("bytes_per_block") = L.bytes_per_block,
                                   py::arg("scale_offset") = L.scale_offset,
                                   py::arg("codebook_size") = L.codebook_size);
        return out;
    }, "The block layouts compiled into the extension (tests compare them with felix.formats).");
    m.def("max_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    });
    m.def("set_num_threads", [](int n) {
#ifdef _OPENMP
        if (n < 1) throw std::invalid_argument("thread count must be >= 1");
        omp_set_num_threads(n);
#endif
    });
    m.def("fp32_to_fp16", &felix::fp32_to_fp16, "IEEE binary16 bits of a float (round to nearest even).");
    m.def("fp16_to_fp32", &felix::fp16_to_fp32);
}
